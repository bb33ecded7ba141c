"""Where and how a run writes, from its intent: a policy's location, encryption and retention;
a location's store; or the store of this service's settings.

- `policy_id`: the policy's location, its retention, and encryption with this service's active
  key when the policy asks for it (`EncryptionKeyMissing` without NEST_BACKUP_ENCRYPTION_KEYS),
  plain otherwise.
- `location_id` only: that location, with the settings' retention and keys.
- neither: the `default` policy if there is one (as if named), else the settings' store.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

from libs.common.contract.backup import RunBackup
from services.backup import errors
from services.backup.catalog import Catalog, PolicyEntry
from services.backup.schedules.policies import retention_of
from services.backup.snapshots.runs import BackupContext
from services.backup.stores.locations import LocationStores


@dataclass(frozen=True)
class ResolvedRun:
    context: BackupContext
    policy_id: str | None = None
    location_id: str | None = None
    """None: the store of the settings."""


async def policy_for(intent: RunBackup, catalog: Catalog) -> PolicyEntry | None:
    if intent.policy_id is not None:
        policy = await catalog.policy(intent.policy_id)
        if policy is None:
            raise errors.PolicyNotFound(
                f"backup policy {intent.policy_id!r} is not known to the backup service "
                "(deleted, or its definition has not arrived yet)"
            )
        return policy
    if intent.location_id is None:
        return await catalog.default_policy()
    return None


@contextlib.asynccontextmanager
async def resolve_run(
    intent: RunBackup, base: BackupContext, catalog: Catalog, stores: LocationStores
) -> AsyncIterator[ResolvedRun]:
    """The context of one run; a location's store is borrowed for as long as this is open."""
    policy = await policy_for(intent, catalog)
    if policy is not None:
        assert policy.spec is not None
        spec = policy.spec
        if spec.encrypted and base.keyring is None:
            raise errors.EncryptionKeyMissing(
                f"backup policy {policy.name!r} asks for encryption but the backup service has "
                "no key: set NEST_BACKUP_ENCRYPTION_KEYS"
            )
        async with stores.use(spec.location_id) as (_, store):
            context = dataclasses.replace(
                base,
                store=store,
                keyring=base.keyring if spec.encrypted else None,
                retention=retention_of(spec),
            )
            yield ResolvedRun(context, policy.policy_id, spec.location_id)
        return
    if intent.location_id is not None:
        async with stores.use(intent.location_id) as (_, store):
            yield ResolvedRun(dataclasses.replace(base, store=store), None, intent.location_id)
        return
    yield ResolvedRun(base)
