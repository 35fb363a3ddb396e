"""The checks behind admission: metadata -> key, then key -> permissions -> quota lease.

Owns reading `authorization: Bearer <key>` from call metadata (plain (name, value) pairs, as
both grpc.aio and Ray Serve hand them over), the status of each refusal (UNAUTHENTICATED,
PERMISSION_DENIED, RESOURCE_EXHAUSTED with a retry time) and its message. The order the two steps
run in (authenticate once per request, `admit_key` per stream) belongs to `transport/admission.py`,
which both doors go through. Knows nothing of gRPC or of what the call does: the caller
says which recipe and whether exact mode is asked.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from eft_serve.auth.keys import ApiKey, KeyStore
from eft_serve.auth.quotas import Lease, Limiter, QuotaLimiter
from eft_serve.errors import PermissionDenied, Unauthenticated, clip

log = logging.getLogger("eft_serve")

Metadata = Iterable[tuple[str, str | bytes]]


class Gate:
    def __init__(self, store: KeyStore, limiter: Limiter | None = None) -> None:
        self.store = store
        # Per replica by default; `auth.quota_store: redis` shares it (`shared_quotas`).
        self.limiter: Limiter = limiter or QuotaLimiter()

    def authenticate(self, metadata: Metadata) -> ApiKey:
        """The caller's key entry, or `Unauthenticated` saying what to send."""
        values = [v for k, v in metadata if k.lower() == "authorization"]
        if not values:
            raise Unauthenticated(
                "no API key: send the metadata 'authorization: Bearer <key>' "
                "(eft/eft-client: --api-key or $EFT_API_KEY; Python client: api_key=)"
            )
        raw = values[0].decode("utf-8", "replace") if isinstance(values[0], bytes) else values[0]
        scheme, _, key = raw.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("malformed authorization metadata: expected 'Bearer <key>'")
        entry = self.store.lookup(key.strip())
        if entry is None:
            raise Unauthenticated("unknown API key: check the key, or ask the operator for one (`eft keys add`)")
        return entry

    async def admit_key(self, key: ApiKey, recipe: str, exact: bool) -> Lease:
        """Check an authenticated key's recipe and exact mode, take a quota lease (release it when
        the call ends). A request that opens several streams authenticates once and calls this per
        stream (`transport.admission`). Async: a shared quota lease is one round trip to the store."""
        if not key.allows_recipe(recipe):
            log.info("key %s denied recipe %s", key.id, recipe)
            raise PermissionDenied(
                f"key {key.id!r} may not use recipe {clip(recipe)}; it may use: {', '.join(key.allowed_recipes)}"
            )
        if exact and not key.exact_mode:
            log.info("key %s denied exact mode", key.id)
            raise PermissionDenied(
                f"key {key.id!r} may not request exact mode (logprob_top_k = 0); "
                "send logprob_top_k > 0 (e.g. 20), or ask the operator for a key with exact_mode: true"
            )
        return await self.limiter.lease(key.id, key.max_concurrent_streams, key.tokens_per_minute)
