"""What the doctor reports: one line per finding (what, the evidence, the fix) and a JSON report."""

import dataclasses

SEVERITIES = ('error', 'warning', 'info')  # error: a bug; warning: suspicious; info: a figure.


@dataclasses.dataclass
class Finding:
  check: str  # Stable id that tests and tools match on, e.g. 'leakage', 'frozen_layer'.
  severity: str  # One of SEVERITIES.
  message: str  # What is wrong, with its evidence (numbers measured on this config).
  fix: str = ''  # What to change.
  data: dict = dataclasses.field(default_factory=dict)  # Figures behind the message (JSON).

  def line(self) -> str:
    fix = f' -> fix: {self.fix}' if self.fix else ''
    return f'[{self.severity}] {self.check}: {self.message}{fix}'


def problems(findings: list[Finding]) -> list[Finding]:
  """The findings that say something is wrong (errors and warnings)."""
  return [f for f in findings if f.severity != 'info']
