"""Stops training when an eval metric has not improved for `patience` evals."""

import dataclasses
import math

from core.errors import KilnError


@dataclasses.dataclass
class EarlyStopping:
  metric: str
  mode: str  # 'max' or 'min'.
  patience: int  # 0 disables stopping (the best value is still tracked).
  best: float | None = None
  evals_without_improvement: int = 0

  def __post_init__(self):
    if self.mode not in ('max', 'min'):
      raise KilnError(f"config.early_stopping.mode='{self.mode}' must be 'max' or 'min'")

  def update(self, eval_metrics: dict[str, float]) -> bool:
    """Records one eval; returns True when training should stop."""
    if self.metric not in eval_metrics:
      raise KilnError(f"config.early_stopping.metric='{self.metric}' is not an eval metric: "
                      f"choose one of {', '.join(sorted(eval_metrics))}")
    value = eval_metrics[self.metric]
    sign = 1.0 if self.mode == 'max' else -1.0
    if self.best is None or (math.isfinite(value) and sign * (value - self.best) > 0):
      self.best, self.evals_without_improvement = value, 0
    else:
      self.evals_without_improvement += 1
    return 0 < self.patience <= self.evals_without_improvement

  def to_json(self) -> dict:
    return {'best': self.best, 'evals_without_improvement': self.evals_without_improvement}

  def load_json(self, saved: dict) -> None:
    self.best = saved['best']
    self.evals_without_improvement = saved['evals_without_improvement']
