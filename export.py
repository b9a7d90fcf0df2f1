"""Exports a trained run for the runtime its next user has, and checks the artifact.

  python export.py --workdir=runs/mnist --format=onnx --out=exports/mnist_onnx
      [--max_examples=0] [--min_agreement=0.999]

Formats: jax (jax.export, batch polymorphic), saved_model (TF Serving layout, signature
serving_default), tflite, tflite_fp16, tflite_dynamic, tflite_int8 (full-integer, calibrated
on training inputs), onnx. The run's config.json rebuilds the model; the artifact is run on
the held-out split beside the JAX model and --out/export.json records bytes, max_abs_diff,
label_agreement, both metrics and latency. Agreement under config.export.min_agreement
(or --min_agreement) fails the export with one line.
"""

import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TF's and the converters' INFO lines.

import backends  # noqa: E402  First: before JAX or TF start threads.

backends.configure_host(may_restart=__name__ == '__main__')

from absl import app, flags  # noqa: E402

from configs import base  # noqa: E402
from core.errors import KilnError  # noqa: E402
from export import exporter, formats  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'Folder of a finished train.py run.')
_FORMAT = flags.DEFINE_enum('format', None, list(formats.FORMATS), 'Artifact format.')
_OUT = flags.DEFINE_string('out', None, 'Folder to write (replaced whole if it exists).')
_MAX_EXAMPLES = flags.DEFINE_integer(
    'max_examples', None, 'Held-out examples to verify on (default config.export, 0 = all).')
_MIN_AGREEMENT = flags.DEFINE_float(
    'min_agreement', None, 'Lowest label agreement with JAX (default config.export).')


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  for flag in (_WORKDIR, _FORMAT, _OUT):
    if not flag.value:
      sys.exit(f'error: --{flag.name} is required: {flags.FLAGS[flag.name].help}')
  try:
    report = exporter.export(_WORKDIR.value, _FORMAT.value, _OUT.value,
                             max_examples=_MAX_EXAMPLES.value, min_agreement=_MIN_AGREEMENT.value,
                             defaults=base.get_base_config())
  except KilnError as e:
    sys.exit(f'error: {e}')
  print(exporter.summary_line(report))
  print(f'wrote {os.path.abspath(_OUT.value)} ({exporter.EXPORT_JSON} has the figures)')


if __name__ == '__main__':
  app.run(main)
