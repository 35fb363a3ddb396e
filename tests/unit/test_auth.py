"""API keys (hashing, the keys file, lookup), per-key quotas with a fake clock, and the admission gate."""

from __future__ import annotations

import pytest

from eft_serve.auth.gate import Gate
from eft_serve.auth.keys import ApiKey, KeyStore, add_key, hash_key, load_key_store
from eft_serve.auth.quotas import Lease, QuotaLimiter
from eft_serve.errors import PermissionDenied, RateLimited, Unauthenticated


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _yaml(*entries: str) -> str:
    return "keys:\n" + "".join(entries)


def test_keys_are_stored_as_sha256_hex_and_looked_up_by_the_key() -> None:
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    store = KeyStore.from_yaml(_yaml(f"  - id: alice\n    sha256: {hash_key('secret-a').upper()}\n"))
    key = store.lookup("secret-a")
    assert key is not None and key.id == "alice" and key.sha256 == hash_key("secret-a")
    assert store.lookup("secret-b") is None and store.lookup(hash_key("secret-a")) is None
    assert key.allows_recipe("anything")  # empty allowed_recipes = all
    assert not key.exact_mode  # exact mode must be granted


@pytest.mark.parametrize(
    "text, match",
    [
        (_yaml("  - id: a\n    sha256: not-a-hash\n"), "64-character hex"),
        (_yaml("  - id: a\n    sha256: " + "a" * 64 + "\n    max_concurent_streams: 2\n"), "max_concurent_streams"),
        (_yaml(f"  - id: a\n    sha256: {'a' * 64}\n", f"  - id: a\n    sha256: {'b' * 64}\n"), "duplicate key id"),
        ("keys: [", "not a valid keys file"),
    ],
)
def test_bad_keys_files_fail_with_the_reason(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        KeyStore.from_yaml(text)


def test_keys_from_a_file_and_an_environment_variable(tmp_path) -> None:
    path = tmp_path / "keys.yaml"
    key_a = add_key(path, "a", allowed_recipes=["upscale"], max_concurrent_streams=2, tokens_per_minute=100)
    assert key_a not in path.read_text() and hash_key(key_a) in path.read_text()
    env = {"EFT_KEYS": _yaml(f"  - id: b\n    sha256: {hash_key('kb')}\n    exact_mode: true\n")}
    store = load_key_store(path, "EFT_KEYS", environ=env)
    a, b = store.lookup(key_a), store.lookup("kb")
    assert a is not None and a.allowed_recipes == ["upscale"] and a.tokens_per_minute == 100
    assert b is not None and b.exact_mode
    with pytest.raises(ValueError, match="already exists"):
        add_key(path, "a")
    with pytest.raises(ValueError, match="EFT_KEYS is not set"):
        load_key_store(None, "EFT_KEYS", environ={})
    with pytest.raises(ValueError, match="does not exist"):
        load_key_store(tmp_path / "missing.yaml", None)
    with pytest.raises(ValueError, match="duplicate key id"):
        load_key_store(path, "EFT_KEYS", environ={"EFT_KEYS": _yaml(f"  - id: a\n    sha256: {'c' * 64}\n")})


def test_token_bucket_goes_negative_for_the_call_in_flight_and_refills() -> None:
    clock = Clock()
    q = QuotaLimiter(clock)
    lease = q.acquire("k", None, 60)  # 60 tokens/minute = 1 per second, starts full
    lease.charge(70)  # the call in flight may overdraw
    lease.release()
    assert q.tokens_left("k") == pytest.approx(-10)
    with pytest.raises(RateLimited) as err:
        q.acquire("k", None, 60)
    assert err.value.retry_after_s == pytest.approx(11) and "retry in 11 s" in err.value.message
    clock.t += 10.5
    with pytest.raises(RateLimited):
        q.acquire("k", None, 60)
    clock.t += 0.5
    q.acquire("k", None, 60).release()  # refilled to 1 token: admitted
    clock.t += 3600
    assert q.tokens_left("k") == pytest.approx(60)  # never above the per-minute capacity


def test_concurrency_slots_are_released_once_per_lease() -> None:
    q = QuotaLimiter(Clock())
    first = q.acquire("k", 2, None)
    second = q.acquire("k", 2, None)
    with pytest.raises(RateLimited, match="2 of its 2 concurrent calls") as err:
        q.acquire("k", 2, None)
    assert err.value.retry_after_s > 0
    q.acquire("other", 2, None)  # per key
    first.release()
    first.release()  # idempotent: frees one slot, not two
    assert q.open_calls("k") == 1
    third = q.acquire("k", 2, None)
    with pytest.raises(RateLimited):
        q.acquire("k", 2, None)
    second.release()
    third.release()
    assert q.open_calls("k") == 0


async def test_gate_checks_key_then_permissions_then_quota() -> None:
    keys = [
        ApiKey(id="full", sha256=hash_key("kf"), exact_mode=True, max_concurrent_streams=1),
        ApiKey(id="narrow", sha256=hash_key("kn"), allowed_recipes=["large_base"]),
    ]
    gate = Gate(KeyStore(keys), QuotaLimiter(Clock()))

    async def admit(metadata: list[tuple[str, str | bytes]], recipe: str, exact: bool) -> Lease:
        # transport/admission.py's order: authenticate once, then a lease per stream
        return await gate.admit_key(gate.authenticate(metadata), recipe, exact)

    with pytest.raises(Unauthenticated, match="authorization: Bearer"):
        await admit([], "upscale", exact=False)
    with pytest.raises(Unauthenticated, match="Bearer <key>"):
        await admit([("authorization", "kf")], "upscale", exact=False)
    with pytest.raises(Unauthenticated, match="unknown API key"):
        await admit([("authorization", "Bearer nope")], "upscale", exact=False)
    with pytest.raises(PermissionDenied, match="may not use recipe 'upscale'; it may use: large_base"):
        await admit([("authorization", "Bearer kn")], "upscale", exact=False)
    with pytest.raises(PermissionDenied, match="exact mode"):
        await admit([("authorization", "Bearer kn")], "large_base", exact=True)
    (await admit([("authorization", "Bearer kn")], "large_base", exact=False)).release()
    lease = await admit([("Authorization", b"bearer kf")], "upscale", exact=True)
    with pytest.raises(RateLimited):
        await admit([("authorization", "Bearer kf")], "upscale", exact=False)
    lease.release()
    assert gate.authenticate([("authorization", "Bearer kf")]).id == "full"
