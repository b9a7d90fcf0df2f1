"""Pytree key paths as the 'a/b/kernel' strings that rules, checkpoints and logs use."""


def path_string(path) -> str:
  """'stages/0/1/norm/scale' for a pytree key path; the form the exclusion regex sees."""
  parts = []
  for key in path:
    for attr in ('key', 'idx', 'name'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return '/'.join(parts)
