"""Reading readiness and the endpoint from what the management API answers."""

from __future__ import annotations

from typing import Any

from libs.common.contract.cluster import ClusterEndpoint, ClusterSpec, ReconcileCluster
from services.provisioner.reconciler import (
    control_plane_lost,
    datastore_lost,
    deployment_rolled_out,
    endpoint_of,
    statefulset_ready,
)


def intent(**spec: Any) -> ReconcileCluster:
    return ReconcileCluster(
        cluster_id="c-1", name="demo", generation=1, spec=ClusterSpec.model_validate(spec)
    )


def workload(generation: int, **observed: object) -> dict[str, Any]:
    return {"metadata": {"generation": generation}, "status": observed}


def test_a_deployment_is_rolled_out_only_when_every_replica_is_new_and_available() -> None:
    assert not deployment_rolled_out(workload(2, observedGeneration=1), 2)[0]
    rolling = workload(2, observedGeneration=2, updatedReplicas=1, availableReplicas=2, replicas=3)
    ok, message = deployment_rolled_out(rolling, 2)
    assert not ok and "1/2 updated" in message
    surplus = workload(2, observedGeneration=2, updatedReplicas=2, availableReplicas=2, replicas=3)
    assert not deployment_rolled_out(surplus, 2)[0]
    done = workload(2, observedGeneration=2, updatedReplicas=2, availableReplicas=2, replicas=2)
    assert deployment_rolled_out(done, 2) == (True, "2/2 control-plane replicas available")


def test_etcd_is_ready_with_every_member_on_the_current_revision() -> None:
    assert not statefulset_ready(workload(1), 3)[0]
    assert not statefulset_ready(workload(1, observedGeneration=1, readyReplicas=3), 3)[0]
    ready = workload(1, observedGeneration=1, readyReplicas=3, updatedReplicas=3)
    assert statefulset_ready(ready, 3)[0]


def test_a_control_plane_loses_replicas_only_below_what_it_had_and_what_is_asked() -> None:
    # Scaling 1 -> 3 with one replica available, and down 3 -> 1 with one left: no loss.
    scaling_up = workload(2, observedGeneration=1, availableReplicas=1, replicas=1)
    assert not control_plane_lost(scaling_up, 3, had=1)
    assert not control_plane_lost(workload(2, availableReplicas=1, replicas=3), 1, had=3)
    # A template change surges first, so both replicas stay available.
    assert not control_plane_lost(workload(3, observedGeneration=3, availableReplicas=2), 2, 2)
    # A pod gone, rollout or not: fewer than it had.
    assert control_plane_lost(workload(2, observedGeneration=2, availableReplicas=1), 2, 2)
    assert control_plane_lost(scaling_up | {"status": {"availableReplicas": 0}}, 3, had=1)


def test_an_etcd_member_is_lost_unless_a_rolling_update_restarts_it() -> None:
    steady = {"observedGeneration": 1, "currentRevision": "a", "updateRevision": "a"}
    one_down = workload(1, readyReplicas=2, replicas=3, updatedReplicas=3, **steady)
    assert datastore_lost(one_down, 3, had=3)
    rolling = {"observedGeneration": 2, "currentRevision": "a", "updateRevision": "b"}
    restarting = workload(2, readyReplicas=2, replicas=3, updatedReplicas=1, **rolling)
    assert not datastore_lost(restarting, 3, had=3)
    two_down = workload(2, readyReplicas=1, replicas=3, updatedReplicas=1, **rolling)
    assert datastore_lost(two_down, 3, had=3)


def test_endpoint_from_a_load_balancer() -> None:
    service = {"spec": {"type": "LoadBalancer"}, "status": {"loadBalancer": {}}}
    assert endpoint_of(intent(), service, None)[1] == "WaitingForLoadBalancer"
    service["status"] = {"loadBalancer": {"ingress": [{"ip": "192.0.2.5"}]}}
    assert endpoint_of(intent(), service, None)[0] == ClusterEndpoint(host="192.0.2.5", port=6443)
    assert endpoint_of(intent(), None, None)[1] == "ServiceMissing"


def test_endpoint_from_a_node_port_needs_a_node_address() -> None:
    spec = {"network": {"serviceType": "NodePort"}}
    service = {"spec": {"type": "NodePort", "ports": [{"name": "https", "nodePort": 31234}]}}
    endpoint, reason, message = endpoint_of(intent(**spec), service, None)
    assert endpoint is None and reason == "NodeAddressUnset" and "NEST_NODE_ADDRESS" in message
    assert endpoint_of(intent(**spec), service, "10.0.0.1")[0] == ClusterEndpoint(
        host="10.0.0.1", port=31234
    )


def test_node_ports_keep_what_runs_and_probe_after_collisions() -> None:
    from services.provisioner import manifests
    from services.provisioner.reconciler import _node_ports

    assert _node_ports("c-1", {"https": 31000, "konnectivity": 31001}, 3) == (31000, 31001)
    assert _node_ports("c-1", {}, 0) == (None, None)
    api, konnectivity = _node_ports("c-1", {}, 2)
    assert api == manifests.stable_node_port("c-1", "apiserver", 2)
    assert konnectivity is not None and konnectivity != api
