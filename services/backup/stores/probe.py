"""The live check of a store: write, read back and delete a small object.

`probe` raises one exception type per failure kind (`errors.BucketNotFound`,
`errors.CredentialsRejected`, `errors.EndpointUnreachable`, ...), which is what the API's
"test this location" check needs.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from services.backup import errors
from services.backup.stores.objects import ObjectStore
from services.backup.stores.s3 import S3Store
from services.backup.stores.streams import collect, iterate

PROBE_PREFIX = ".nest-probe/"


async def probe(store: ObjectStore) -> None:
    """Write, read back and delete a probe object; raise a specific StoreError on failure."""
    if isinstance(store, S3Store):
        await store.check_bucket()
    key = f"{PROBE_PREFIX}{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(6)}"
    payload = secrets.token_bytes(1024)
    await store.put(key, iterate(payload))
    try:
        echoed = await collect(store.get(key))
        if echoed != payload:
            raise errors.ProbeMismatch(f"probe object read back differs at {store.description}")
    finally:
        await store.delete(key)
    if await store.exists(key):
        raise errors.StoreError(f"probe object could not be deleted at {store.description}")
