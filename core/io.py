"""Small file helpers shared by the loop and the benchmarks."""

import json
import os
import tempfile
from typing import Any


def write_text_atomic(path: str, text: str, suffix: str = '') -> None:
  """Writes `text` so that readers see either the old file or the whole new one."""
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp_path = tempfile.mkstemp(prefix='.tmp-', suffix=suffix, dir=directory)
  try:
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    os.replace(tmp_path, path)
  except BaseException:
    os.unlink(tmp_path)
    raise


def write_json_atomic(path: str, payload: Any) -> None:
  """Writes JSON so that readers see either the old file or the whole new one."""
  write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + '\n', suffix='.json')
