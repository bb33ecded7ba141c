"""The restore Job and its Secret: valid Kubernetes (strict schemas), and what they rely on."""

from __future__ import annotations

import base64
import re
from typing import Any

import kubernetes_validate
import pytest

from libs.common.contract.cluster import ClusterSpec, ReconcileCluster
from services.provisioner import manifests, names
from services.provisioner.restore_member import _parser

MANAGEMENT_VERSIONS = ("1.35", "1.36", "1.37")
CLUSTER_ID = "0b5c1f9e-6a1d-4d53-9a57-2f0d6c8e4a11"
RESTORE_ID = "0f8a2c4e-1b3d-4f5a-9c7e-8d6b4a2c0e1f"
SHA = "ab" * 32
IMAGE = "mirror.example.com:5000/nest/nest:0.1.0"
URL = "http://backup.nest-system.svc:8091/v1/restores/x/snapshot?expires=1&token=secret-token"


def intent(replicas: int = 3) -> ReconcileCluster:
    return ReconcileCluster(
        cluster_id=CLUSTER_ID,
        name="demo",
        generation=2,
        spec=ClusterSpec.model_validate({"datastore": {"replicas": replicas}}),
    )


def job(ordinal: int = 0, replicas: int = 3) -> dict[str, Any]:
    return manifests.etcd_restore_job(
        intent(replicas),
        restore_id=RESTORE_ID,
        ordinal=ordinal,
        image=IMAGE,
        snapshot_sha256=SHA,
    )


@pytest.mark.parametrize("management_version", MANAGEMENT_VERSIONS)
@pytest.mark.parametrize(("ordinal", "replicas"), [(0, 1), (0, 3), (2, 3)])
def test_restore_job_is_valid_kubernetes(
    management_version: str, ordinal: int, replicas: int
) -> None:
    kubernetes_validate.validate(job(ordinal, replicas), management_version, strict=True)


@pytest.mark.parametrize("management_version", MANAGEMENT_VERSIONS)
def test_restore_secret_is_valid_kubernetes(management_version: str) -> None:
    secret = manifests.etcd_restore_secret(intent(), RESTORE_ID, URL)
    kubernetes_validate.validate(secret, management_version, strict=True)
    assert base64.b64decode(secret["data"][manifests.RESTORE_URL_KEY]).decode() == URL


def test_the_job_mounts_its_members_volume_where_etcd_keeps_its_data() -> None:
    rendered = job(ordinal=2)
    pod = rendered["spec"]["template"]["spec"]
    assert pod["volumes"] == [
        {"name": "data", "persistentVolumeClaim": {"claimName": "data-etcd-2"}}
    ]
    # The claim the StatefulSet's volumeClaimTemplate makes for member 2.
    statefulset = manifests.etcd_statefulset(intent(), manifests.RenderSettings())
    template = statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    assert f"{template}-{statefulset['metadata']['name']}-2" == "data-etcd-2"
    (container,) = pod["containers"]
    assert container["volumeMounts"] == [{"name": "data", "mountPath": manifests.ETCD_DATA_MOUNT}]
    assert pod["restartPolicy"] == "Never"
    assert container["image"] == IMAGE


def test_the_job_runs_restore_member_with_the_members_etcd_flags() -> None:
    rendered = job(ordinal=1)
    (container,) = rendered["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python"]
    assert container["args"][:2] == ["-m", "services.provisioner.restore_member"]
    parsed = _parser().parse_args(container["args"][2:])  # the command's own parser accepts it
    namespace = names.namespace_for("demo")
    etcd = manifests.etcd_statefulset(intent(), manifests.RenderSettings())
    etcd_flags = dict(
        arg.removeprefix("--").split("=", 1)
        for arg in etcd["spec"]["template"]["spec"]["containers"][0]["args"]
    )
    assert str(parsed.data_dir) == etcd_flags["data-dir"] == "/var/lib/etcd/data"
    assert parsed.name == "etcd-1"
    assert parsed.initial_cluster == etcd_flags["initial-cluster"]
    assert parsed.initial_cluster_token == etcd_flags["initial-cluster-token"] == CLUSTER_ID
    assert parsed.initial_advertise_peer_urls == (
        f"https://etcd-1.etcd.{namespace}.svc:{names.ETCD_PEER_PORT}"
    )
    assert etcd_flags["initial-advertise-peer-urls"].replace("$(POD_NAME)", "etcd-1") == (
        parsed.initial_advertise_peer_urls
    )
    assert parsed.sha256 == SHA and parsed.restore_id == RESTORE_ID


def test_the_url_and_its_token_stay_out_of_the_job_spec() -> None:
    rendered = job()
    assert "secret-token" not in repr(rendered)
    (container,) = rendered["spec"]["template"]["spec"]["containers"]
    assert "--url=$(NEST_RESTORE_URL)" in container["args"]
    (env,) = container["env"]
    assert env["valueFrom"]["secretKeyRef"] == {
        "name": manifests.restore_secret_name(RESTORE_ID),
        "key": manifests.RESTORE_URL_KEY,
    }


def test_names_are_dns_labels_and_distinct_per_restore_and_member() -> None:
    label = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    seen = set()
    for restore_id in (RESTORE_ID, "another-restore"):
        for ordinal in range(3):
            name = manifests.restore_job_name(restore_id, ordinal)
            assert label.match(name), name
            seen.add(name)
        assert label.match(manifests.restore_secret_name(restore_id))
    assert len(seen) == 6
    assert manifests.resource_path(job()) == (
        f"/apis/batch/v1/namespaces/nest-demo/jobs/{manifests.restore_job_name(RESTORE_ID, 0)}"
    )


def test_the_job_is_labelled_for_its_cluster_and_restore() -> None:
    labels = job()["metadata"]["labels"]
    assert labels[names.CLUSTER_ID_LABEL] == CLUSTER_ID
    assert labels[names.COMPONENT_LABEL] == manifests.COMPONENT_RESTORE
    assert labels[manifests.RESTORE_ID_LABEL] == manifests.restore_suffix(RESTORE_ID)


def test_member_names_resolve_inside_the_job_while_etcd_is_scaled_down() -> None:
    # etcdutl resolves every peer URL; the headless Service has no records without pods.
    pod = job(replicas=3)["spec"]["template"]["spec"]
    (alias,) = pod["hostAliases"]
    namespace = names.namespace_for("demo")
    assert alias == {
        "ip": "127.0.0.1",
        "hostnames": [f"etcd-{n}.etcd.{namespace}.svc" for n in range(3)],
    }
    (container,) = pod["containers"]
    cluster = _parser().parse_args(container["args"][2:]).initial_cluster
    for hostname in alias["hostnames"]:
        assert f"https://{hostname}:{names.ETCD_PEER_PORT}" in cluster
