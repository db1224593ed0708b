"""API keys -> tenants.

A caller presents a key (``Authorization: Bearer <key>`` or ``X-API-Key: <key>``); the server hashes it
with sha256 and compares the digest with every configured digest using ``hmac.compare_digest`` (no
early exit, so timing does not reveal which prefix matched). Keys are configured either as digests in
``serve.api_keys`` (``{sha256_hex: tenant}``) or in plain text through the env var named by
``serve.api_keys_env`` (``key:tenant,key:tenant``), which is hashed on load. Neither keys nor digests
are ever logged or put into error messages.

Start-up refuses a key table that could surprise its operator: a plain key shorter than
:data:`MIN_KEY_CHARS`, a tenant name that is not a safe id, or one digest configured for two
tenants (formerly the last one won silently).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Mapping
from pathlib import Path

from raydb.config import RaydbConfig, ServeConfig
from raydb.ids import check_safe_id

__all__ = ["MIN_KEY_CHARS", "hash_key", "parse_env_keys", "merge_digests", "KeyRing", "key_from_headers",
           "with_env_keys"]

_HEX64 = re.compile(r"[0-9a-f]{64}")
MIN_KEY_CHARS = 16  # a guessable key is no key; generate them with e.g. `openssl rand -hex 24`


def hash_key(key: str) -> str:
    """The sha256 hex digest under which a key is configured."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def parse_env_keys(text: str, var: str = "RAYDB_API_KEYS") -> dict[str, str]:
    """``"key:tenant,key:tenant"`` -> ``{sha256(key): tenant}``; the message never echoes a key."""
    out: dict[str, str] = {}
    for i, item in enumerate(p.strip() for p in text.replace("\n", ",").split(",")):
        if not item:
            continue
        key, sep, tenant = item.rpartition(":")
        if not sep or not key or not tenant:
            raise ValueError(f"${var}: entry {i + 1} is not 'key:tenant'")
        if len(key) < MIN_KEY_CHARS:
            raise ValueError(f"${var}: entry {i + 1}: key is shorter than {MIN_KEY_CHARS} characters")
        try:
            check_safe_id(tenant)
        except ValueError as exc:
            raise ValueError(f"${var}: entry {i + 1}: tenant {exc}") from None
        digest = hash_key(key)
        if out.get(digest, tenant) != tenant:
            raise ValueError(f"${var}: entry {i + 1}: the same key is configured for two tenants")
        out[digest] = tenant
    return out


def merge_digests(*tables: Mapping[str, str]) -> dict[str, str]:
    """One ``{digest: tenant}`` table from several; ValueError when a digest maps to two tenants."""
    out: dict[str, str] = {}
    for table in tables:
        for digest, tenant in table.items():
            digest = digest.strip().lower()
            if out.get(digest, tenant) != tenant:
                raise ValueError("serve.api_keys: the same key is configured for two tenants "
                                 f"({out[digest]!r} and {tenant!r})")
            out[digest] = tenant
    return out


class KeyRing:
    """Digest -> tenant table; ``tenant_for(key)`` is the only lookup."""

    def __init__(self, digests: Mapping[str, str]) -> None:
        self._entries: list[tuple[str, str]] = []
        for digest, tenant in merge_digests(digests).items():
            if not _HEX64.fullmatch(digest):
                raise ValueError("serve.api_keys: every key must be a sha256 hex digest (64 hex chars) "
                                 "of an API key, not the key itself")
            try:
                check_safe_id(tenant)
            except ValueError as exc:
                raise ValueError(f"serve.api_keys: tenant {exc}") from None
            self._entries.append((digest, tenant))

    @classmethod
    def from_config(cls, serve_cfg: ServeConfig, environ: Mapping[str, str] | None = None) -> KeyRing:
        """Digests from ``serve.api_keys`` plus the keys in ``serve.api_keys_file`` and
        ``$<serve.api_keys_env>`` (when set).

        Called where the app is built (``environ`` defaults to that process's environment); the
        replicas get the resulting digests in their config (:func:`with_env_keys`) and never read
        the environment or the file.
        """
        environ = os.environ if environ is None else environ
        tables = [serve_cfg.api_keys]
        if serve_cfg.api_keys_file:
            try:
                text = Path(serve_cfg.api_keys_file).read_text()
            except OSError as exc:
                raise ValueError(f"serve.api_keys_file: cannot read {serve_cfg.api_keys_file}: "
                                 f"{exc.strerror}") from None
            tables.append(parse_env_keys(text, "serve.api_keys_file"))
        env_text = environ.get(serve_cfg.api_keys_env, "")
        if env_text.strip():
            tables.append(parse_env_keys(env_text, serve_cfg.api_keys_env))
        return cls(merge_digests(*tables))

    def digests(self) -> dict[str, str]:
        """The validated ``{digest: tenant}`` table (what travels to the replicas)."""
        return dict(self._entries)

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
    """``cfg`` with every configured key folded into ``serve.api_keys`` as digests, validated.

    Runs where the app is built, so a bad key table fails at start-up, and replicas on other nodes
    (whose environment and file system lack the keys) know them too. Only digests travel.
    """
    if cfg.serve.auth != "api_key":
        return cfg
    ring = KeyRing.from_config(cfg.serve, environ)
    cfg = cfg.model_copy(deep=True)
    cfg.serve.api_keys = ring.digests()
    cfg.serve.api_keys_file = None
    return cfg
