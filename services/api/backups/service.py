"""Triggering a backup: a `RunBackup` intent staged in the outbox, published after the commit."""

from __future__ import annotations

import logging
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncSession

from libs.common.contract import envelope_for
from libs.common.contract.backup import RunBackup
from libs.common.logging import correlation_id
from services.api.backups.schemas import BackupAccepted, BackupRequest
from services.api.clusters import repository as clusters
from services.api.outbox import repository as outbox
from services.api.problems import Conflict, FieldError, InvalidInput

log = logging.getLogger(__name__)

SOURCE = "api"
Notify = Callable[[], None]


def _unknown(field: str, message: str) -> InvalidInput:
    return InvalidInput(
        f"invalid input: {field}: {message}", errors=[FieldError(field=field, message=message)]
    )


async def request_backup(
    session: AsyncSession, body: BackupRequest, notify: Notify
) -> BackupAccepted:
    if body.target == "cluster":
        cluster = await clusters.get(session, body.cluster_id or "")
        if cluster is None:
            raise _unknown("clusterId", f"cluster {body.cluster_id!r} does not exist")
        if cluster.deletion_requested_at is not None:
            raise Conflict(f"cluster {cluster.name!r} is being deleted")
        intent = RunBackup(
            target=f"cluster-{cluster.name}",
            kind="etcd",
            cluster_id=cluster.id,
            kubernetes_version=cluster.spec.get("kubernetesVersion"),
        )
    else:
        intent = RunBackup(target="foundry", kind="foundry")
    subject, envelope = envelope_for(
        intent, source=SOURCE, subject=intent.target, correlation_id=correlation_id.get()
    )
    outbox.add(session, subject, envelope)
    await session.commit()
    notify()
    log.info("backup requested", extra={"target": intent.target, "intentId": envelope.id})
    return BackupAccepted(intent_id=envelope.id, target=intent.target, kind=intent.kind)
