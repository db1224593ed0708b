"""API keys -> tenants.

A caller presents a key (``Authorization: Bearer <key>`` or ``X-API-Key: <key>``); the server hashes it
with sha256 and compares the digest with every configured digest using ``hmac.compare_digest`` (no
early exit, so timing does not reveal which prefix matched). Keys are configured either as digests in
``serve.api_keys`` (``{sha256_hex: tenant}``) or in plain text through the env var named by
``serve.api_keys_env`` (``key:tenant,key:tenant``), which is hashed on load. Neither keys nor digests
are ever logged or put into error messages.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping

from raydb.config import RaydbConfig, ServeConfig
from raydb.ids import check_safe_id

__all__ = ["hash_key", "parse_env_keys", "KeyRing", "key_from_headers", "with_env_keys"]

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def hash_key(key: str) -> str:
    """The sha256 hex digest under which a key is configured."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_env_keys(text: str, var: str = "RAYDB_API_KEYS") -> dict[str, str]:
    """``"key:tenant,key:tenant"`` -> ``{sha256(key): tenant}``; the message never echoes a key."""
    out: dict[str, str] = {}
    for i, item in enumerate(p.strip() for p in text.split(",")):
        if not item:
            continue
        key, sep, tenant = item.rpartition(":")
        if not sep or not key or not tenant:
            raise ValueError(f"${var}: entry {i + 1} is not 'key:tenant'")
        try:
            check_safe_id(tenant)
        except ValueError as exc:
            raise ValueError(f"${var}: entry {i + 1}: tenant {exc}") from None
        out[hash_key(key)] = tenant
    return out


class KeyRing:
    """Digest -> tenant table; ``tenant_for(key)`` is the only lookup."""

    def __init__(self, digests: Mapping[str, str]) -> None:
        self._entries: list[tuple[str, str]] = []
        for digest, tenant in digests.items():
            digest = digest.strip().lower()
            if not _HEX64.match(digest):
                raise ValueError("serve.api_keys: every key must be a sha256 hex digest (64 hex chars) "
                                 "of an API key, not the key itself")
            self._entries.append((digest, tenant))

    @classmethod
    def from_config(cls, serve_cfg: ServeConfig, environ: Mapping[str, str] | None = None) -> KeyRing:
        """Digests from ``serve.api_keys`` plus the keys in ``$<serve.api_keys_env>`` (if set)."""
        environ = os.environ if environ is None else environ
        digests = dict(serve_cfg.api_keys)
        env_text = environ.get(serve_cfg.api_keys_env, "")
        if env_text.strip():
            digests.update(parse_env_keys(env_text, serve_cfg.api_keys_env))
        return cls(digests)

    def __len__(self) -> int:
        return len(self._entries)

    def tenant_for(self, key: str | None) -> str | None:
        """The tenant of ``key``, or None when it matches no configured key."""
        if not key:
            return None
        digest = hash_key(key)
        found: str | None = None
        for configured, tenant in self._entries:  # compare against all: constant work per entry
            if hmac.compare_digest(configured, digest):
                found = tenant
        return found


def key_from_headers(headers: Mapping[str, str]) -> str | None:
    """The presented key: ``Authorization: Bearer <key>`` first, else ``X-API-Key``."""
    auth = headers.get("authorization", "")
    scheme, _, value = auth.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = headers.get("x-api-key", "").strip()
    return key or None


def with_env_keys(cfg: RaydbConfig, environ: Mapping[str, str] | None = None) -> RaydbConfig:
    """Fold plain keys from ``$<serve.api_keys_env>`` (here, where the app is built) into digests, so
    replicas on other nodes, whose environment lacks the variable, know them too. Only digests travel.
    """
    environ = os.environ if environ is None else environ
    text = environ.get(cfg.serve.api_keys_env, "")
    if cfg.serve.auth != "api_key" or not text.strip():
        return cfg
    cfg = cfg.model_copy(deep=True)
    cfg.serve.api_keys = {**cfg.serve.api_keys, **parse_env_keys(text, cfg.serve.api_keys_env)}
    return cfg
