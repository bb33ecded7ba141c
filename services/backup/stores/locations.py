"""Object stores of the backup locations the API defined, opened from the catalog's copy.

A location's secret access key arrives sealed (libs.common.secrets, associated data
`backup-location:<id>`) and is opened here with the Sealer from this service's settings
(NEST_SECRETS_KEY or `<data dir>/secrets.key`, the same key the API uses). One store is kept per
location and generation: a run borrows it with `use()`; when the location changes (a new
generation) or disappears, the old store is closed as soon as no run holds it any more. Unlike
the API's live probe, these stores use the normal retries and timeouts.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from libs.common.contract.backup_location import BackupLocationSpec
from libs.common.contract.backup_policy import ApplyBackupLocation, DeleteBackupLocation
from libs.common.secrets import SealedSecretError, Sealer
from services.backup import errors
from services.backup.catalog import Catalog, CatalogMessage, LocationEntry
from services.backup.stores.local import LocalStore
from services.backup.stores.objects import ObjectStore
from services.backup.stores.s3 import S3Config, S3Store

log = logging.getLogger(__name__)


def store_for(spec: BackupLocationSpec, *, probing: bool = False) -> ObjectStore:
    """The store of a location spec (secret included): with the default retries, or, for a
    live probe that must answer quickly, one attempt per request and a short read timeout."""
    if spec.kind == "local":
        return LocalStore(Path(spec.path or ""))
    quick = {"max_attempts": 1, "read_timeout": 15.0} if probing else {}
    config = S3Config.model_validate(
        {
            "endpoint_url": spec.endpoint_url,
            "bucket": spec.bucket,
            "prefix": spec.prefix,
            "region": spec.region,
            "access_key_id": spec.access_key_id,
            "secret_access_key": spec.secret_access_key,
            "path_style": spec.path_style,
            **quick,
        }
    )
    return S3Store(config)


def open_spec(entry: LocationEntry, sealer: Sealer) -> BackupLocationSpec:
    """The entry's spec with its secret opened; raises SecretUnreadable."""
    assert entry.location is not None
    spec = entry.location.spec.model_dump(exclude={"secret_access_key"})
    sealed = entry.location.sealed_secret_access_key
    if sealed is not None:
        try:
            spec["secret_access_key"] = sealer.open(
                sealed, context=f"backup-location:{entry.location_id}"
            )
        except SealedSecretError as exc:
            raise errors.SecretUnreadable(
                f"backup location {entry.name!r}: {exc}; give the backup service the API's "
                "NEST_SECRETS_KEY"
            ) from None
    return BackupLocationSpec.model_validate(spec)


@dataclass
class _Open:
    generation: int
    store: ObjectStore
    users: int = 0
    retired: bool = False


class LocationStores:
    """Stores by location id, cached per generation, closed when replaced and unused."""

    def __init__(self, catalog: Catalog, sealer: Sealer) -> None:
        self.catalog = catalog
        self.sealer = sealer
        self._open: dict[str, _Open] = {}
        catalog.listeners.append(self._changed)

    async def _changed(self, message: CatalogMessage) -> None:
        """A location changed or went away: close its store once no run holds it."""
        if isinstance(message, ApplyBackupLocation | DeleteBackupLocation):
            held = self._open.get(message.location_id)
            if held is not None and (
                isinstance(message, DeleteBackupLocation) or held.generation < message.generation
            ):
                await self._retire(message.location_id, held)

    @contextlib.asynccontextmanager
    async def use(self, location_id: str) -> AsyncIterator[tuple[LocationEntry, ObjectStore]]:
        """Borrow the store of `location_id` at its current generation for one run or drill."""
        entry = await self.catalog.location(location_id)
        if entry is None:
            raise errors.LocationNotFound(
                f"backup location {location_id!r} is not known to the backup service "
                "(deleted, or its definition has not arrived yet)"
            )
        held = self._open.get(location_id)
        if held is None or held.generation != entry.generation:
            if held is not None:
                await self._retire(location_id, held)
            held = _Open(entry.generation, store_for(open_spec(entry, self.sealer)))
            self._open[location_id] = held
        held.users += 1
        try:
            yield entry, held.store
        finally:
            held.users -= 1
            if held.retired and held.users == 0:
                await held.store.close()

    async def _retire(self, location_id: str, held: _Open) -> None:
        held.retired = True
        if self._open.get(location_id) is held:
            del self._open[location_id]
        if held.users == 0:
            await held.store.close()
            log.info("backup location store closed (changed)", extra={"locationId": location_id})

    async def close(self) -> None:
        for location_id, held in list(self._open.items()):
            await self._retire(location_id, held)
