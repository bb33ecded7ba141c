"""The provisioner's bookkeeping in JetStream key-value buckets (it owns no database).

- `nest_provisioner_clusters`: one `ClusterRecord` per cluster id: the last intent, what was
  last reported, and, once a delete intent was carried out, a tombstone (`deleted`) that
  confirms the cluster is gone, so leftovers labelled with its id may be removed.
- `nest_provisioner_leases`: short-lived keys that let exactly one replica run periodic work.
  Their bucket's max age is the lease time: a holder that dies loses its lease by itself.
"""

from __future__ import annotations

import logging

import nats.js.errors
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue
from pydantic import BaseModel, ConfigDict, Field

from libs.common.bus import Bus
from libs.common.contract.cluster import ClusterEndpoint, Condition, ReconcileCluster
from libs.common.contract.restore import RestoreEtcd
from libs.common.kv import bucket_keys, leases_bucket, open_bucket
from services.provisioner.status import Capacity

log = logging.getLogger(__name__)

CLUSTERS_BUCKET = "nest_provisioner_clusters"
LEASES_BUCKET = leases_bucket("provisioner")


class ActiveRestore(BaseModel):
    """A restore of the cluster's etcd under way (services/provisioner/restore.py): while one
    is recorded, reconcile passes of the cluster are paused; a restart resumes it at `step`."""

    model_config = ConfigDict(extra="ignore")

    intent: RestoreEtcd
    step: str = "ScalingDown"
    """The phase being carried out: ScalingDown, Restoring or ScalingUp."""
    started_at: str = ""


class ClusterRecord(BaseModel):
    """What the provisioner remembers about one cluster between passes and restarts."""

    model_config = ConfigDict(extra="ignore")

    cluster_id: str
    name: str
    generation: int = 0
    intent: ReconcileCluster | None = None
    delete_requested: bool = False
    """A delete intent arrived; the deletion may still be under way."""
    deleted: bool = False
    """A delete intent was carried out: the cluster is confirmed gone."""
    was_ready: bool = False
    ready_capacity: Capacity | None = None
    """What the cluster had when it was last Ready (None before that, and in records written
    before it was kept: then the spec counts as what it had)."""
    upgrade_from: str | None = None
    """The version a running upgrade started from; cleared once it rolled out."""
    applied: bool = False
    """Objects were created in the management cluster for this cluster."""
    endpoint: ClusterEndpoint | None = None
    conditions: list[Condition] = Field(default_factory=list)
    reported: str = ""
    """A digest of the last status event published, so only transitions are published."""
    restore: ActiveRestore | None = None
    """An etcd restore under way; reconciliation of the cluster waits for it."""
    finished_restores: list[str] = Field(default_factory=list)
    """Ids of the latest finished restores, so a redelivered restore intent is not rerun."""


class ClusterStore:
    """`ClusterRecord`s by cluster id in the clusters bucket."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @classmethod
    async def open(cls, bus: Bus) -> ClusterStore:
        return cls(await open_bucket(bus, KeyValueConfig(bucket=CLUSTERS_BUCKET, history=1)))

    async def get(self, cluster_id: str) -> ClusterRecord | None:
        try:
            entry = await self.kv.get(cluster_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        if entry.value is None:
            return None
        return ClusterRecord.model_validate_json(entry.value)

    async def put(self, record: ClusterRecord) -> None:
        await self.kv.put(record.cluster_id, record.model_dump_json().encode())

    async def ids(self) -> list[str]:
        return await bucket_keys(self.kv)
