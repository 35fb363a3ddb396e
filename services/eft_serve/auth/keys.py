"""The API keys file: entries with a sha256 hash of each key (never the key), loading and lookup.

Owns the keys file format (YAML: `keys: [{id, sha256, allowed_recipes, exact_mode,
max_concurrent_streams, tokens_per_minute}]`), hashing, key generation and lookup by presented
key. Knows nothing of transports: callers hand it the key string a client sent.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from eft_serve.strict_model import StrictModel

KEY_PREFIX = "eft_"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    """The sha256 hex digest stored for `key`."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    """A new random API key (256 bits, URL-safe)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


class ApiKey(StrictModel):
    """One key's entry: its name for logs, its hash, and what it may do."""

    id: str = Field(min_length=1)
    sha256: str
    # Recipes this key may use; empty = all.
    allowed_recipes: list[str] = Field(default_factory=list)
    # May request logprob_top_k = 0 (the exact, full-vocabulary merge: the costliest requests).
    exact_mode: bool = False
    # Open Generate/Complete/Score calls at once; None = unlimited.
    max_concurrent_streams: int | None = Field(4, ge=1)
    # Generated tokens per minute (token bucket, refilled continuously); None = unlimited.
    tokens_per_minute: int | None = Field(None, ge=1)

    @field_validator("sha256")
    @classmethod
    def _is_sha256_hex(cls, v: str) -> str:
        v = v.strip().lower()
        if not _HEX64.match(v):
            raise ValueError("sha256 must be the 64-character hex digest of the key (`eft keys add` writes it)")
        return v

    def allows_recipe(self, recipe: str) -> bool:
        return not self.allowed_recipes or recipe in self.allowed_recipes


class KeysFile(StrictModel):
    keys: list[ApiKey] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> KeysFile:
        for what in ("id", "sha256"):
            values = [getattr(k, what) for k in self.keys]
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"duplicate key {what}: {dupes if what == 'id' else len(dupes)}")
        return self


class KeyStore:
    """Looks presented keys up by their hash."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self._by_hash: Mapping[str, ApiKey] = {k.sha256: k for k in keys}
        self.keys = list(keys)

    def lookup(self, key: str) -> ApiKey | None:
        return self._by_hash.get(hash_key(key))

    @classmethod
    def from_yaml(cls, text: str, source: str = "keys file") -> KeyStore:
        try:
            data = yaml.safe_load(text) or {}
            return cls(KeysFile.model_validate(data).keys)
        except (yaml.YAMLError, ValidationError) as e:
            raise ValueError(f"{source}: not a valid keys file: {e}") from None


def load_key_store(
    keys_file: str | Path | None, keys_env: str | None, environ: Mapping[str, str] | None = None
) -> KeyStore:
    """Keys from `keys_file` and/or the YAML held by the environment variable `keys_env`."""
    env = os.environ if environ is None else environ
    keys: list[ApiKey] = []
    if keys_file is None and keys_env is None:
        raise ValueError("auth is enabled but neither auth.keys_file nor auth.keys_env is set")
    if keys_file is not None:
        path = Path(keys_file)
        if not path.is_file():
            raise ValueError(f"auth.keys_file {str(path)!r} does not exist; create it with `eft keys add`")
        keys += KeyStore.from_yaml(path.read_text(), str(path)).keys
    if keys_env is not None:
        if keys_env not in env:
            raise ValueError(f"auth.keys_env: the environment variable {keys_env} is not set")
        keys += KeyStore.from_yaml(env[keys_env], f"${keys_env}").keys
    KeysFile(keys=keys)  # ids and hashes unique across both sources
    return KeyStore(keys)


def add_key(
    path: str | Path,
    key_id: str,
    *,
    allowed_recipes: list[str] | None = None,
    exact_mode: bool = False,
    max_concurrent_streams: int | None = 4,
    tokens_per_minute: int | None = None,
) -> str:
    """Append a new key to the keys file at `path` (created if missing); returns the key itself."""
    path = Path(path)
    current = KeyStore.from_yaml(path.read_text(), str(path)).keys if path.is_file() else []
    if any(k.id == key_id for k in current):
        raise ValueError(f"{path}: a key with id {key_id!r} already exists")
    key = generate_key()
    entry = ApiKey(
        id=key_id,
        sha256=hash_key(key),
        allowed_recipes=list(allowed_recipes or []),
        exact_mode=exact_mode,
        max_concurrent_streams=max_concurrent_streams,
        tokens_per_minute=tokens_per_minute,
    )
    text = yaml.safe_dump(KeysFile(keys=[*current, entry]).model_dump(mode="json"), sort_keys=False)
    path.write_text("# EFT Serve API keys: sha256 hashes only (see docs/security.md#api-keys)\n" + text)
    return key
