"""The container and cluster files: Kubernetes manifests pass strict schema validation offline
(kubernetes-validate ships the schemas), agree with serve.py (port, probe paths, the API-key
Secret, non-root user), and the Dockerfile keeps its promises (multi-stage, slim base, non-root,
pinned dependencies, a health check). No Docker daemon or cluster is needed."""

import copy
import pathlib
import re

import kubernetes_validate
import pytest
import yaml
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


def test_the_dockerfile_builds_a_slim_non_root_image_with_a_health_check():
  text = (REPO / 'Dockerfile').read_text()
  stages = re.findall(r'^FROM\s+(\S+)', text, re.M)
  assert len(stages) >= 2, 'multi-stage: dependencies built apart from the runtime image'
  base = re.search(r'^ARG PYTHON_IMAGE=(\S+)', text, re.M).group(1)
  assert 'slim' in base
  user = re.findall(r'^USER\s+(\S+)', text, re.M)
  assert user and user[-1].split(':')[0] not in ('root', '0')
  deployment = _resources()[('Deployment', 'kiln-serve')]
  assert int(user[-1].split(':')[0]) == deployment['spec']['template']['spec'][
      'securityContext']['runAsUser']
  health = re.search(r'^HEALTHCHECK .*?CMD (.*)$', text, re.M | re.S).group(1)
  assert '/v2/health/ready' in health and '8501' in health
  assert '--constraint deploy/constraints.txt' in text
  for folder in re.findall(r'^COPY (\w+) \1$', text, re.M):  # Every package copied exists.
    assert (REPO / folder / '__init__.py').exists(), folder
  ignored = (REPO / '.dockerignore').read_text().split()
  assert {'.git', '.venv', 'runs', 'exports'} <= set(ignored)


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
