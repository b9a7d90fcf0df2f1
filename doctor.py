"""Checks a config before a long run and names what is wrong: its data (labels, leakage,
normalisation, NaN/Inf, vocabulary, masks), its initialisation (initial loss against the
uniform-prediction loss, output and activation scales, dead units, frozen layers) and its
optimisation (overfitting one batch, a learning-rate range test, the largest batch that fits).

  python doctor.py --config=configs/default.py [--workdir=runs/doctor] [--config.KEY=VALUE ...]

Each finding is one line: what, the evidence, the fix. The report is <workdir>/doctor.json,
with TensorBoard curves (overfit loss, range test) and doctor_lr_range.png beside it. Exits
with status 1 when any finding is an error or a warning.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

import backends  # noqa: E402  First: before JAX or TF start threads.

backends.configure_host(may_restart=__name__ == '__main__')

import train  # noqa: E402  (its own configure_host call repeats the settings above)
from absl import flags  # noqa: E402

from core.errors import KilnError  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', 'runs/doctor', 'Folder for doctor.json and its plots.')


def main(argv, config_flag):
  train.check_arguments(argv)
  config = train.load_config(config_flag)
  # Imported here: a missing flag is reported without loading the training stack (~5 s).
  from doctor import run
  try:
    report = run.diagnose(config, _WORKDIR.value)
  except KilnError as e:
    sys.exit(f'error: {e}')
  for finding in report['findings']:
    print(finding.line())
  path = os.path.join(os.path.abspath(_WORKDIR.value), 'doctor.json')
  print(f"{report['problems']} problem(s) in {len(report['findings'])} findings; report: {path}")
  sys.exit(1 if report['problems'] else 0)


if __name__ == '__main__':
  train.run_entry_point(main, config_flag=train.define_config_flag())
