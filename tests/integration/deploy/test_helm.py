"""The Helm chart (deploy/helm/nest), linted and rendered by the real `helm` CLI.

Helm v4.3.2 is built from its Go module once per machine (`scripts/kube-binaries`,
`tests.support.kube.binaries.helm()`); `tests.support.helm` runs `helm lint --strict` and
`helm template` with each set of values. What it renders is checked here: strictly valid
Kubernetes (kubernetes-validate, 1.33 and the newest schemas, each rendered for that version),
every Deployment runs a real `nest run <service>`, probes reach the port the service listens on,
secrets come only from Secrets, and values.schema.json refuses incomplete values.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from cli.main import SERVICES
from libs.common.settings import Settings
from tests.support import helm
from tests.support.kube import binaries
from tests.support.parts import missing

pytestmark = pytest.mark.timeout(3600)  # the first use on a machine builds helm (minutes)

CHART = Path(__file__).resolve().parents[3] / "deploy" / "helm" / "nest"
KUBE_VERSIONS = ("1.33", "1.37")
"""Kubernetes versions the rendered objects must be valid for: the chart's floor and newest."""

REQUIRED: dict[str, Any] = {
    "nats": {"url": "nats://nats.nats.svc:4222"},
    "database": {"existingSecret": "nest-database"},
    "secretsKey": {"existingSecret": "nest-secrets-key"},
}
S3 = {
    "enabled": True,
    "endpoint": "https://s3.example.com:9000",
    "bucket": "nest-backups",
    "existingSecret": "nest-s3",
    "accessKeyIdKey": "AWS_ACCESS_KEY_ID",
    "secretAccessKeyKey": "AWS_SECRET_ACCESS_KEY",
}
VALUE_SETS: dict[str, dict[str, Any]] = {
    "required": REQUIRED,
    "s3-backup": REQUIRED
    | {"backup": {"s3": S3, "encryption": {"existingSecret": "nest-backup-keys", "key": "keys"}}},
    "admin-token": REQUIRED | {"adminToken": {"existingSecret": "nest-admin", "key": "token"}},
    "airgap": REQUIRED
    | {
        "image": {"repository": "mirror.example.com/nest/nest", "tag": "1.2.3"},
        "imagePullSecrets": [{"name": "mirror-pull"}],
        "imageRegistry": "mirror.example.com/k8s",
        "api": {"replicas": 3},
    },
}
BROKEN: dict[str, dict[str, Any]] = {
    "no-nats": {"database": REQUIRED["database"], "secretsKey": REQUIRED["secretsKey"]},
    "nats-not-a-url": REQUIRED | {"nats": {"url": "localhost:4222"}},
    "no-database": {"nats": REQUIRED["nats"], "secretsKey": REQUIRED["secretsKey"]},
    "no-secrets-key": {"nats": REQUIRED["nats"], "database": REQUIRED["database"]},
    "s3-without-bucket": REQUIRED | {"backup": {"s3": {"enabled": True, "existingSecret": "x"}}},
}
SECRET_SETTINGS = {
    "NEST_DATABASE_URL",
    "NEST_ADMIN_TOKEN",
    "NEST_BACKUP_S3_ACCESS_KEY_ID",
    "NEST_BACKUP_S3_SECRET_ACCESS_KEY",
    "NEST_BACKUP_ENCRYPTION_KEYS",
    "NEST_SECRETS_KEY",
}
STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
)


@pytest.fixture(scope="module", autouse=True)
def helm_cli() -> Path:
    """The helm binary, built on first use (or a skip: no Go here and nothing cached)."""
    if not binaries.is_built("helm", binaries.HELM_VERSION) and not binaries.go_available():
        missing(
            f"go is not installed and helm {binaries.HELM_VERSION} is not built in "
            f"{binaries.CACHE_ROOT} (scripts/kube-binaries builds it)"
        )
    return binaries.helm()


@cache
def render(value_set: str, kube_version: str | None = None) -> list[dict[str, Any]]:
    """`helm template` of a value set, once per test worker."""
    return helm.template(CHART, VALUE_SETS[value_set], "nest", kube_version)


@pytest.fixture(params=list(VALUE_SETS))
def value_set(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def objs(value_set: str) -> list[dict[str, Any]]:
    return render(value_set)


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in by_kind(objs, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, got {len(found)}"
    return found[0]


def deployments(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Deployments by the component label."""
    found = by_kind(objs, "Deployment")
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in found}


def the_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def environment(objs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, Any]:
    """The container's effective environment: envFrom ConfigMaps first, then env entries.

    Plain values map to their string, everything else to its `valueFrom`.
    """
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"unexpected envFrom {source}"
        env |= one(objs, "ConfigMap", source["configMapRef"]["name"])["data"]
    for entry in container.get("env", []):
        env[entry["name"]] = entry.get("value", entry.get("valueFrom"))
    return env


@cache
def validate(text: str, version: str) -> None:
    kubernetes_validate.validate(json.loads(text), version, strict=True)


# Lint


def test_chart_lints_clean_with_the_required_values() -> None:
    result = helm.lint(CHART, REQUIRED)
    assert result.passed, result.output
    assert result.errors == []
    assert result.findings("WARNING") == [], result.output


def test_lint_without_the_required_values_fails_on_them() -> None:
    result = helm.lint(CHART)
    assert not result.passed
    (values,) = [error for error in result.errors if error.path == "values.yaml"]
    assert "at '/nats': missing property 'url'" in values.message, result.output
    assert "at '/database': missing property 'existingSecret'" in values.message
    assert "at '/secretsKey/existingSecret': minLength: got 0, want 1" in values.message
    assert any(
        "don't meet the specifications of the schema" in error.message for error in result.errors
    ), result.output


# Rendered objects


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_every_object_is_valid_kubernetes(value_set: str, version: str) -> None:
    objs = render(value_set, f"{version}.0")
    assert objs
    for obj in objs:
        try:
            validate(json.dumps(obj, sort_keys=True), version)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(p) for p in error.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {error.message}")


def test_every_object_has_the_standard_labels(objs: list[dict[str, Any]]) -> None:
    for obj in objs:
        labels = obj["metadata"].get("labels", {})
        assert all(labels.get(key) for key in STANDARD_LABELS), obj["metadata"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
    for component, deployment in deployments(objs).items():
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert pod_labels["app.kubernetes.io/component"] == component


def test_no_secret_is_rendered(objs: list[dict[str, Any]]) -> None:
    assert by_kind(objs, "Secret") == []


def test_each_deployment_runs_its_nest_service(objs: list[dict[str, Any]]) -> None:
    found = deployments(objs)
    assert set(found) == {"api", "provisioner", "backup"}
    for component, deployment in found.items():
        assert component in SERVICES
        container = the_container(deployment)
        assert "command" not in container  # the image's entrypoint is `nest`
        assert container["args"] == ["run", component]


def test_probes_reach_the_port_the_service_listens_on(objs: list[dict[str, Any]]) -> None:
    for component, deployment in deployments(objs).items():
        container = the_container(deployment)
        env = environment(objs, container)
        if component == "api":
            assert env["NEST_API_HOST"] == "0.0.0.0"
            listens = int(env["NEST_API_PORT"])
        else:
            assert env["NEST_HEALTH_HOST"] == "0.0.0.0"
            listens = int(env["NEST_HEALTH_PORT"])
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = container[probe]["httpGet"]
            assert get["path"] == path, (component, probe)
            port = ports[get["port"]] if isinstance(get["port"], str) else get["port"]
            assert port == listens, (component, probe)


def test_secrets_come_only_from_secret_refs(value_set: str, objs: list[dict[str, Any]]) -> None:
    values = VALUE_SETS[value_set]
    (config_map,) = by_kind(objs, "ConfigMap")
    assert not SECRET_SETTINGS & set(config_map["data"])
    sealing = ("nest-secrets-key", "secrets-key")
    expected: dict[str, dict[str, tuple[str, str]]] = {
        "api": {
            "NEST_DATABASE_URL": ("nest-database", "database-url"),
            "NEST_SECRETS_KEY": sealing,
        },
        "provisioner": {},
        "backup": {
            "NEST_DATABASE_URL": ("nest-database", "database-url"),
            "NEST_SECRETS_KEY": sealing,
        },
    }
    if token := values.get("adminToken"):
        expected["api"]["NEST_ADMIN_TOKEN"] = (token["existingSecret"], token["key"])
    if s3 := values.get("backup", {}).get("s3"):
        expected["backup"]["NEST_BACKUP_S3_ACCESS_KEY_ID"] = ("nest-s3", "AWS_ACCESS_KEY_ID")
        expected["backup"]["NEST_BACKUP_S3_SECRET_ACCESS_KEY"] = (
            "nest-s3",
            s3["secretAccessKeyKey"],
        )
    if keys := values.get("backup", {}).get("encryption"):
        expected["backup"]["NEST_BACKUP_ENCRYPTION_KEYS"] = (keys["existingSecret"], keys["key"])
    for component, deployment in deployments(objs).items():
        env = environment(objs, the_container(deployment))
        secret_env = {name: value for name, value in env.items() if name in SECRET_SETTINGS}
        assert {
            name: (value["secretKeyRef"]["name"], value["secretKeyRef"]["key"])
            for name, value in secret_env.items()
            if isinstance(value, dict) and set(value) == {"secretKeyRef"}
        } == expected[component]
        assert set(secret_env) == set(expected[component]), f"{component}: plain secret env"


def test_every_setting_the_chart_sets_exists(objs: list[dict[str, Any]]) -> None:
    known = {f"NEST_{name.upper()}" for name in Settings.model_fields}
    for component, deployment in deployments(objs).items():
        env = environment(objs, the_container(deployment))
        assert set(env) <= known, f"{component}: unknown settings {set(env) - known}"
        assert "NEST_KUBECONFIG" not in env  # the provisioner uses its in-cluster config
        assert env["NEST_DATA_DIR"] == "/var/lib/nest"


def test_pods_run_locked_down(objs: list[dict[str, Any]]) -> None:
    for component, deployment in deployments(objs).items():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        container = the_container(deployment)
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert container["resources"]["requests"], component
        assert container["resources"]["limits"]["memory"], component
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        data_dir = environment(objs, container)["NEST_DATA_DIR"]
        assert "emptyDir" in volumes[mounts[data_dir]]
        assert "emptyDir" in volumes[mounts["/tmp"]]  # tempfile needs a writable /tmp


def test_only_the_provisioner_gets_kubernetes_api_access(
    objs: list[dict[str, Any]],
) -> None:
    found = deployments(objs)
    (role,) = by_kind(objs, "ClusterRole")
    (binding,) = by_kind(objs, "ClusterRoleBinding")
    assert by_kind(objs, "Role") == by_kind(objs, "RoleBinding") == []
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    manage = ("get", "list", "watch", "create", "update", "patch", "delete")
    read = ("get", "list", "watch")
    managed = [
        ("", "namespaces"),
        ("", "secrets"),
        ("", "configmaps"),
        ("", "services"),
        ("", "persistentvolumeclaims"),
        ("apps", "statefulsets"),
        ("apps", "deployments"),
        ("policy", "poddisruptionbudgets"),
    ]
    restore = {
        ("apps", f"{r}/scale", v)
        for r in ("statefulsets", "deployments")
        for v in ("get", "patch", "update")
    } | {("batch", "jobs", v) for v in manage}
    assert (
        granted
        == {(g, r, v) for g, r in managed for v in manage}
        | {("", r, v) for r in ("pods", "nodes") for v in read}
        | restore
    )
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    provisioner_pod = found["provisioner"]["spec"]["template"]["spec"]
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": provisioner_pod["serviceAccountName"],
            "namespace": "nest",
        }
    ]
    assert provisioner_pod.get("automountServiceAccountToken", True) is True
    for component in ("api", "backup"):
        pod = found[component]["spec"]["template"]["spec"]
        assert pod["serviceAccountName"] != provisioner_pod["serviceAccountName"]
        assert pod["automountServiceAccountToken"] is False


def test_api_service_and_budget_select_only_api_pods(objs: list[dict[str, Any]]) -> None:
    found = deployments(objs)
    service = one(objs, "Service", "nest-api")
    (budget,) = by_kind(objs, "PodDisruptionBudget")
    for selector in (service["spec"]["selector"], budget["spec"]["selector"]["matchLabels"]):
        for component, deployment in found.items():
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert (selector.items() <= labels.items()) == (component == "api"), component
    api = the_container(found["api"])
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in api["ports"]}
    assert found["api"]["spec"]["replicas"] >= 2


def test_values_reach_the_objects(value_set: str, objs: list[dict[str, Any]]) -> None:
    values = VALUE_SETS[value_set]
    (config_map,) = by_kind(objs, "ConfigMap")
    data = config_map["data"]
    assert data["NEST_NATS_URL"] == values["nats"]["url"]
    assert data["NEST_IMAGE_REGISTRY"] == values.get("imageRegistry", "registry.k8s.io")
    image = values.get("image", {})
    for deployment in deployments(objs).values():
        pod = deployment["spec"]["template"]["spec"]
        expected_image = image.get("repository", "ghcr.io/nest/nest")
        assert the_container(deployment)["image"] == f"{expected_image}:{image.get('tag', '0.1.0')}"
        assert pod.get("imagePullSecrets", []) == values.get("imagePullSecrets", [])
    assert deployments(objs)["api"]["spec"]["replicas"] == values.get("api", {}).get("replicas", 2)
    s3 = values.get("backup", {}).get("s3")
    assert ("NEST_BACKUP_S3_BUCKET" in data) == bool(s3)
    if s3:
        assert data["NEST_BACKUP_S3_BUCKET"] == s3["bucket"]
        assert data["NEST_BACKUP_S3_ENDPOINT"] == s3["endpoint"]


def test_notes_say_how_to_reach_the_api(value_set: str) -> None:
    values = VALUE_SETS[value_set]
    notes = helm.notes(CHART, values)
    assert "port-forward svc/nest-api 8080:8080" in notes
    assert ("/var/lib/nest/admin-token" in notes) == ("adminToken" not in values)
    assert ("backup.s3 is not enabled" in notes) == ("s3" not in values.get("backup", {}))


# values.schema.json


@pytest.mark.parametrize(
    ("broken", "says"),
    [
        ("no-nats", "at '/nats': missing property 'url'"),
        ("nats-not-a-url", "at '/nats/url'"),
        ("no-database", "missing property 'existingSecret'"),
        ("no-secrets-key", "at '/secretsKey/existingSecret': minLength"),
        ("s3-without-bucket", "at '/backup/s3/bucket'"),
    ],
)
def test_schema_refuses_incomplete_values(broken: str, says: str) -> None:
    with pytest.raises(helm.RenderError) as refused:
        helm.template(CHART, BROKEN[broken])
    assert "don't meet the specifications of the schema" in refused.value.message
    assert says in refused.value.message


def test_restore_jobs_reach_the_backup_service_and_run_the_charts_image(
    objs: list[dict[str, Any]],
) -> None:
    found = deployments(objs)
    service = one(objs, "Service", "nest-backup")
    labels = found["backup"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    for component, deployment in found.items():
        own = deployment["spec"]["template"]["metadata"]["labels"]
        assert (service["spec"]["selector"].items() <= own.items()) == (component == "backup")
    (port,) = service["spec"]["ports"]
    container = the_container(found["backup"])
    listens = {p["name"]: p["containerPort"] for p in container["ports"]}
    env = environment(objs, container)
    assert listens[port["targetPort"]] == int(env["NEST_BACKUP_SERVE_PORT"])
    assert env["NEST_BACKUP_SERVE_HOST"] == "0.0.0.0"
    namespace = service["metadata"].get("namespace", "nest")  # the release's namespace
    assert env["NEST_BACKUP_PUBLIC_URL"] == f"http://nest-backup.{namespace}.svc:{port['port']}"
    assert env["NEST_IMAGE"] == container["image"]
