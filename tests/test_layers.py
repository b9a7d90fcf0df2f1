"""The house's layers (../shared/DESIGN.md): a folder imports only folders below it.

Checked from the source (every `import` statement, including those inside functions), so
that a lazy import cannot hide an upward edge. Peers in one layer do not import each other.
"""

import ast
import itertools
import pathlib

from tests.tiny import REPO

# Higher number = higher floor. A folder may import its own modules and any folder with a
# lower number; entry points, benchmarks, notebooks and tests stand above all of them.
LAYERS = {
    'serve': 2, 'export': 2, 'tune': 2, 'doctor': 2, 'trust': 2,
    'loop': 3,
    'tasks': 4, 'compress': 4,
    'trust.training': 4,  # DP-SGD, Group DRO, adversarial training: what wraps a task's loss.
    'models': 5, 'input_pipeline': 5, 'optim': 5, 'parallel': 5, 'monitor': 5,
    'backends': 6,
    'core': 7,
}
CONFIGS = 'configs'  # Config files import only each other (and ml_collections).


def _unit(module: str) -> str | None:
  """The LAYERS key a dotted module name belongs to (the longest that prefixes it)."""
  parts = module.split('.')
  for end in range(len(parts), 0, -1):
    if '.'.join(parts[:end]) in LAYERS:
      return '.'.join(parts[:end])
  return parts[0]


def _imported_folders(path: pathlib.Path) -> set[str]:
  """Project folders (LAYERS keys) that `path` imports."""
  tree = ast.parse(path.read_text(), filename=str(path))
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      names.add(node.module)
  return {_unit(name) for name in names} & (set(LAYERS) | {CONFIGS, 'train', 'generate'})


def _edges() -> dict[tuple[str, str], list[str]]:
  """(importer folder, imported folder) -> files that make the edge."""
  edges: dict[tuple[str, str], list[str]] = {}
  for top in {key.split('.')[0] for key in LAYERS} | {CONFIGS}:
    for path in sorted((REPO / top).rglob('*.py')):
      folder = _unit('.'.join(path.relative_to(REPO).with_suffix('').parts))
      for target in _imported_folders(path) - {folder}:
        edges.setdefault((folder, target), []).append(str(path.relative_to(REPO)))
  return edges


def test_no_folder_imports_a_folder_above_or_beside_it():
  wrong = []
  for (source, target), files in _edges().items():
    if source == CONFIGS or target == CONFIGS or target not in LAYERS:
      wrong.append(f'{source} -> {target} ({files[0]})')
    elif LAYERS[target] <= LAYERS[source]:
      wrong.append(f'{source} (layer {LAYERS[source]}) -> {target} (layer {LAYERS[target]}) '
                   f'in {files[0]}')
  assert not wrong, 'imports against the layers:\n' + '\n'.join(sorted(wrong))


def test_the_folder_import_graph_has_no_cycles():
  graph: dict[str, set[str]] = {}
  for source, target in _edges():
    graph.setdefault(source, set()).add(target)

  def reaches(start, goal, seen=()):
    return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, (*seen, nxt)))
               for nxt in graph.get(start, ()))
  cycles = [(a, b) for a, b in itertools.combinations(sorted(graph), 2)
            if reaches(a, b) and reaches(b, a)]
  assert not cycles, f'folders importing each other: {cycles}'


def test_the_checker_sees_an_upward_import(tmp_path):
  """A lazy upward import inside a function is found (the check cannot pass vacuously)."""
  source = tmp_path / 'module.py'
  source.write_text('def f():\n  from loop import training\n  import tasks.base\n')
  assert _imported_folders(source) == {'loop', 'tasks'}
  assert ('loop', 'tasks') in _edges() or ('tasks', 'models') in _edges()
