"""The one admission path of both client doors (gRPC `EftService` and the OpenAI routes).

Owns the two steps every request takes, in this order: authenticate the caller once per request
(call metadata -> a `Caller`, carried through the request), then admit each stream the request
opens: the recipe and top-k it asked for, defaulted as the coordinator defaults them (exact mode
when the top-k is 0), checked against the caller's key and turned into a quota lease. Without a
`Gate` (`auth.enabled: false`) every caller is `ANONYMOUS` and every lease unlimited. Knows nothing
of wire formats: each door says which recipe and top-k it was asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

from eft_serve.auth.gate import Gate, Metadata
from eft_serve.auth.keys import ApiKey
from eft_serve.auth.quotas import NO_LIMIT, Lease
from eft_serve.coordinator.service import EftCoordinator
from eft_serve.errors import Unauthenticated


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as `Admission.authenticate` found it: the key's entry, or None with auth off."""

    key: ApiKey | None = None

    @property
    def max_concurrent_streams(self) -> int | None:
        return None if self.key is None else self.key.max_concurrent_streams


ANONYMOUS = Caller()


class Admission:
    def __init__(self, gate: Gate | None, coordinator: EftCoordinator) -> None:
        self.gate = gate  # None: no authentication (auth.enabled: false)
        self.coordinator = coordinator  # its defaults decide what a request that names none asks for

    def authenticate(self, metadata: Metadata) -> Caller:
        """The request's caller (once per request); `Unauthenticated` unless the metadata carry a valid key."""
        if self.gate is None:
            return ANONYMOUS
        return Caller(self.gate.authenticate(metadata))

    def check(self, caller: Caller) -> None:
        """`Unauthenticated` for a caller without a key while auth is on (a door that skipped
        `authenticate`): the listing calls' whole check, and the first of `admit`'s."""
        if self.gate is not None and caller.key is None:
            raise Unauthenticated("no API key: send the metadata 'authorization: Bearer <key>'")

    async def admit(self, caller: Caller, recipe: str | None, logprob_top_k: int | None) -> Lease:
        """One stream's quota lease (release it when the stream ends); None = the coordinator's default."""
        self.check(caller)
        if self.gate is None or caller.key is None:
            return NO_LIMIT
        recipe = recipe or self.coordinator.default_recipe
        top_k = self.coordinator.default_logprob_top_k if logprob_top_k is None else logprob_top_k
        return await self.gate.admit_key(caller.key, recipe, exact=top_k == 0)
