"""SHA-256 manifests of the artifacts Kiln writes (checkpoints, exports), checked before loading.

A manifest is one JSON file at the top of the artifact's folder that lists every other file
in it with its digest. Writers call `write_manifest` last, once everything else is in place,
so a half-written artifact has none; readers call `verify` first. A file changed, removed or
added after the manifest was written fails with one line naming it. An artifact without a
manifest (written before Kiln wrote them, or by a process killed before it could) is loaded
unverified, which is logged once per folder.
"""

import hashlib
import json
import os

from absl import logging

from core.errors import KilnError
from core.io import write_json_atomic

MANIFEST_FILE = 'kiln_manifest.json'
ALGORITHM = 'sha256'
_CHUNK_BYTES = 1 << 20  # Large weight files are hashed a piece at a time, never held whole.
_reported_unverified: set[str] = set()  # Folders already logged as loaded without a manifest.


class TamperedArtifact(KilnError):
  """A file of an artifact differs from what its manifest recorded when it was written."""


def file_digest(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(_CHUNK_BYTES):
      digest.update(chunk)
  return digest.hexdigest()


def _files(folder: str) -> list[str]:
  """Every file under `folder` but the manifest, as sorted '/'-joined relative paths."""
  found = []
  for root, dirs, names in os.walk(folder):
    dirs.sort()
    for name in names:
      relative = os.path.relpath(os.path.join(root, name), folder)
      if relative != MANIFEST_FILE:
        found.append(relative.replace(os.sep, '/'))
  return sorted(found)


def write_manifest(folder: str) -> dict[str, str]:
  """Hashes every file under `folder` and writes the manifest there (atomically); returns
  relative path -> SHA-256. Call it after the last other file of the artifact is written."""
  digests = {name: file_digest(os.path.join(folder, name)) for name in _files(folder)}
  write_json_atomic(os.path.join(folder, MANIFEST_FILE),
                    {'algorithm': ALGORITHM, 'files': digests})
  return digests


def has_manifest(folder: str) -> bool:
  return os.path.isfile(os.path.join(folder, MANIFEST_FILE))


def verify(folder: str, what: str, fix: str) -> bool:
  """Checks every file under `folder` against its manifest: True when all match, False (logged
  once per folder) when there is no manifest. Otherwise raises TamperedArtifact, one line that
  starts with `what` (e.g. "checkpoint 40 in '...'"), names the first differing file and ends
  with `fix` (what the user should do about it)."""
  path = os.path.join(folder, MANIFEST_FILE)
  try:
    with open(path) as f:
      manifest = json.load(f)
  except FileNotFoundError:
    if folder not in _reported_unverified:
      _reported_unverified.add(folder)
      logging.warning('%s has no %s (written before Kiln wrote manifests, or stopped before it '
                      'could): loading it unverified', what, MANIFEST_FILE)
    return False
  except (OSError, ValueError) as error:
    raise TamperedArtifact(f'{what}: its {MANIFEST_FILE} cannot be read ({error}): restore an '
                           f'intact copy, or {fix}') from None
  if not isinstance(manifest, dict):
    manifest = {}
  listed = manifest.get('files')
  if manifest.get('algorithm') != ALGORITHM or not isinstance(listed, dict):
    raise TamperedArtifact(f"{what}: its {MANIFEST_FILE} is not a {ALGORITHM} manifest: restore "
                           f'an intact copy, or {fix}')
  for name, expected in sorted(listed.items()):
    file_path = os.path.join(folder, *name.split('/'))
    if not os.path.isfile(file_path):
      raise TamperedArtifact(f'{what}: file {name} is listed in its manifest but missing: it was '
                             f'removed after it was written; restore an intact copy, or {fix}')
    actual = file_digest(file_path)
    if actual != expected:
      raise TamperedArtifact(
          f'{what}: file {name} has SHA-256 {actual[:16]}... but its manifest says '
          f'{str(expected)[:16]}...: the file was changed after it was written; restore an '
          f'intact copy, or {fix}')
  added = sorted(set(_files(folder)) - set(listed))
  if added:
    raise TamperedArtifact(f'{what}: file {added[0]} is not in its manifest: it was added after '
                           f'the artifact was written; remove it, or {fix}')
  return True


def verify_export(folder: str) -> bool:
  """`verify` for an export folder (export.py's --out), as serving and export's own check
  load one."""
  return verify(folder, f"export '{os.path.abspath(folder)}'",
                'export the run again (export.py)')
