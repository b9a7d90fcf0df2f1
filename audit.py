"""Audits a trained run's privacy by membership inference (trust/audit.py).

  python audit.py --workdir=runs/mnist_dp [--num_examples=5000]

Scores training examples against held-out ones (the test split where the source has one)
with the loss attack and the logit-scaled confidence attack, prints each attack's ROC AUC and
true-positive rate at 1% false positives, and writes them to --workdir/audit.json beside the
run's epsilon (summary.json['privacy']) when it trained with DP-SGD.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TF's INFO lines.

import backends  # noqa: E402  First: before JAX or TF start threads.

backends.configure_host(may_restart=__name__ == '__main__')

from absl import app, flags  # noqa: E402

from configs import base  # noqa: E402
from core.errors import KilnError  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder of a finished train.py run.')
_NUM_EXAMPLES = flags.DEFINE_integer(
    'num_examples', 0, 'Members and non-members each (0: all that the smaller side has).')


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  if not _WORKDIR.value:
    sys.exit(f'error: --workdir is required: {flags.FLAGS["workdir"].help}')
  # Imported here: a missing flag is reported without loading the training stack (~5 s).
  from trust import audit
  try:
    report = audit.membership_inference(_WORKDIR.value, _NUM_EXAMPLES.value,
                                        defaults=base.get_base_config())
  except KilnError as e:
    sys.exit(f'error: {e}')
  print(audit.summary_line(report))
  print(f'wrote {os.path.join(os.path.abspath(_WORKDIR.value), audit.AUDIT_JSON)}')


if __name__ == '__main__':
  app.run(main)
