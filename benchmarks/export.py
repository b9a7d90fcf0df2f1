"""Every export format of trained runs, side by side: bytes, held-out metric, agreement with
JAX, single-example latency; one table per run and a size-vs-metric plot.

  .venv/bin/python benchmarks/export.py --run mnist=runs/mnist [--run resnet=runs/resnet18_mnist]
      [--formats jax,saved_model,tflite,...] [--root exports] [--plots docs]

Each artifact goes to --root/<run>/<format> with its export.json (export.py's own checks;
a format that fails them or cannot convert the model is a row saying why, and the sweep
goes on). An export.json already there for the same run and step is reused, so an
interrupted sweep continues (delete the folder to measure again). Figures are from this host.
"""

import argparse
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import backends  # noqa: E402  First: before JAX or TF start threads.

backends.configure_host(may_restart=__name__ == '__main__')

from configs import base  # noqa: E402
from core.errors import KilnError  # noqa: E402
from export import artifact, exporter, formats  # noqa: E402


def _done(out: str, workdir: str, step: int) -> dict | None:
  path = os.path.join(out, exporter.EXPORT_JSON)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    report = json.load(f)
  same = report.get('workdir') == os.path.abspath(workdir) and report.get('step') == step
  return report if same else None


def export_all(name: str, workdir: str, fmts: list[str], root: str) -> list[dict]:
  trained = artifact.load(workdir, base.get_base_config())
  rows = []
  for fmt in fmts:
    out = os.path.join(root, name, fmt)
    try:
      report = _done(out, workdir, trained.step) or exporter.export(workdir, fmt, out,
                                                                   trained=trained)
    except KilnError as e:
      report = {'format': fmt, 'error': str(e)}
    print(exporter.summary_line(report) if 'error' not in report
          else f"{fmt}: failed: {report['error']}", flush=True)
    rows.append(report)
  return rows


def table(name: str, rows: list[dict]) -> list[str]:
  metric = next((r['metric'] for r in rows if 'metric' in r), 'metric')
  fp32 = next((r['bytes'] for r in rows if r.get('format') == 'jax' and 'bytes' in r), None)
  lines = [f'### {name}', '',
           f'| format | bytes | vs jax fp32 | {metric} | JAX {metric} | label agreement | '
           'max abs diff | latency p50 / p99 ms |', '|' + ' --- |' * 8]
  for r in rows:
    if 'error' in r:
      lines.append(f"| {r['format']} | failed: {r['error']} |||||||")
      continue
    ratio = f"{r['bytes'] / fp32:.2f}x" if fp32 else '-'
    lines.append(f"| {r['format']} | {r['bytes']:,} | {ratio} | {r[metric]:.4f} | "
                 f"{r['jax_' + metric]:.4f} | {r['label_agreement']:.4%} | "
                 f"{r['max_abs_diff']:.1e} | {r['latency_ms_p50']:.2f} / "
                 f"{r['latency_ms_p99']:.2f} |")
  return lines


def plot(results: dict[str, list[dict]], folder: str) -> str:
  import matplotlib
  matplotlib.use('Agg')  # Files only: no display on servers and CI.
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.8), squeeze=False)
  for ax, (name, rows) in zip(axes[0], results.items()):
    done = [r for r in rows if 'error' not in r]
    for r in done:
      ax.scatter(r['bytes'] / 1e6, r[r['metric']], label=r['format'])
    if done:
      ax.set(xscale='log', xlabel='artifact size (MB)', ylabel=done[0]['metric'],
             title=f'{name}: size vs held-out {done[0]["metric"]}')
      ax.legend(fontsize=7)
  path = os.path.join(folder, 'export_size_vs_metric.png')
  fig.tight_layout()
  fig.savefig(path + '.tmp.png', dpi=110)
  os.replace(path + '.tmp.png', path)  # Never a half-written picture.
  plt.close(fig)
  return path


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--run', action='append', required=True,
                      help='name=workdir of a finished train.py run (repeatable)')
  parser.add_argument('--formats', default=','.join(formats.FORMATS),
                      help='comma-separated formats (default: all)')
  parser.add_argument('--root', default='exports', help='folder of the artifacts')
  parser.add_argument('--plots', default='docs', help="folder for the PNG ('' for none)")
  args = parser.parse_args(argv)
  fmts = args.formats.split(',')
  unknown = set(fmts) - set(formats.FORMATS)
  if unknown:
    parser.error(f"unknown formats {sorted(unknown)}: choose from {', '.join(formats.FORMATS)}")
  results = {}
  for spec in args.run:
    name, sep, workdir = spec.partition('=')
    if not sep:
      parser.error(f'--run {spec}: write it as name=workdir')
    try:
      results[name] = export_all(name, workdir, fmts, args.root)
    except KilnError as e:
      sys.exit(f'error: {e}')
  for name, rows in results.items():
    print('\n'.join(['', *table(name, rows)]))
  if args.plots:
    print('wrote', plot(results, args.plots))


if __name__ == '__main__':
  main()
