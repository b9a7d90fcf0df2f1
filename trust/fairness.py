"""Fairness reports of finished runs: two runs' per-group figures side by side, as
benchmarks/fairness.py prints them and notebooks/06_trust.ipynb shows them."""


def comparison_table(erm: dict, dro: dict) -> list[str]:
  """Markdown rows from two summary.json dicts of runs with config.fairness.group set: each
  group's accuracy (and training examples) under ERM and Group DRO, then the gaps, the worst
  group's lift and the mean's cost against the target of issue 25."""
  groups = erm['fairness']['groups']
  sizes = dict(zip(groups, erm['fairness']['train_examples']))
  weights = dict(zip(groups, dro['fairness'].get('group_weights', [float('nan')] * len(groups))))
  feature = erm['fairness']['group']
  a, b = erm['final_eval'], dro['final_eval']
  rows = [f'| {feature} | training examples | ERM | Group DRO | Group DRO q (end) |',
          '| --- | --- | --- | --- | --- |']
  for g in groups:
    key = f'accuracy_{feature}_{g}'
    rows.append(f'| {g} | {sizes[g]} | {100 * a[key]:.1f}% | {100 * b[key]:.1f}% | '
                f'{weights[g]:.3f} |')
  for name, label in (('accuracy', 'mean (all)'), ('worst_group_accuracy', f'worst {feature}'),
                      ('group_accuracy_gap', 'best - worst'),
                      ('demographic_parity_difference', 'demographic parity diff.'),
                      ('equalized_odds_difference', 'equalized odds diff.')):
    rows.append(f'| {label} | | {100 * a[name]:.1f}% | {100 * b[name]:.1f}% | |')
  worst = min(groups, key=lambda g: a[f'accuracy_{feature}_{g}'])
  key = f'accuracy_{feature}_{worst}'
  rows.append(f"\nERM's worst {feature}, {worst}: {100 * a[key]:.1f}% -> {100 * b[key]:.1f}% "
              'under Group DRO')
  lift = 100 * (b['worst_group_accuracy'] - a['worst_group_accuracy'])
  cost = 100 * (a['accuracy'] - b['accuracy'])
  met = lift >= 3 and cost <= 1
  rows.append(f'worst {feature} lift {lift:+.1f} points, mean cost {cost:+.1f} points '
              f'(target: lift >= 3 at cost <= 1): {"met" if met else "not met"}')
  return rows
