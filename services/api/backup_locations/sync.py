"""At API start, stage `ApplyBackupLocation` and `ApplyBackupPolicy` for every row again.

The backup service ignores a generation it already holds, so this only repairs a copy that was
lost (a new NATS, a wiped KV bucket) and costs one small message per resource otherwise.
"""

from __future__ import annotations

import logging

from services.api.backup_locations import service as locations
from services.api.backup_policies import repository
from services.api.backup_policies import service as policies
from services.api.kit.db import Database

log = logging.getLogger(__name__)


async def restage_all(db: Database) -> int:
    """Stage Apply intents for every location, then every policy; returns how many.

    Locations first, so the backup service never holds a policy before the location it names."""
    async with db.session() as session:
        orm = await session.orm()
        staged = 0
        for location in await repository.all_locations(orm):
            locations.stage_apply(session, location)
            staged += 1
        for policy in await repository.all_policies(orm):
            policies.stage_apply(session, policy)
            staged += 1
        await session.commit()
    if staged:
        log.info(
            "backup locations and policies staged for the backup service", extra={"count": staged}
        )
    return staged
