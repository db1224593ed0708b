"""The per-tenant audit log: one JSON line per request — who did what, when, and how it ended.

Written by :mod:`raydb.serving.gate` once a request is answered (refusals included: a 401, a 429 or
a 413 says as much about a caller as a 200). A line::

    {"time": "2026-12-04T10:00:00.123Z", "tenant": "t1", "caller": "key", "client": "10.0.0.7",
     "method": "POST", "path": "/v1/generate", "status": 200, "outcome": "ok", "duration_ms": 812,
     "subject_id": "alice", "adapter_version": "v0003", "num_images": 1}

``caller`` is ``key`` (a valid API key: ``tenant`` is its tenant), ``no key`` or ``invalid key``
(``tenant`` null; the route answered 401 unless it is public) or ``auth off``. ``outcome``: ``ok``
(1xx-3xx), ``refused`` (4xx), ``failed`` (5xx, or no answer at all). Routes add what the request
was about (:func:`note`: subject, version, training id); prompts only when the operator opts in
(``serve.audit_prompts``). Never written: API keys or their digests, request bodies, photos.

Every line goes to the ``raydb.audit`` logger; with ``serve.audit_dir`` it is also appended to
``<audit_dir>/<tenant>.jsonl`` (``_anonymous.jsonl`` for callers without a valid key or with auth
off; a tenant name never starts with ``_``), by a writer thread, so a slow disk never holds the
event loop. Lines are per ingress replica; with several, each appends its own (a shared folder gets
the lines of all: each line is one ``write`` of under 4 KiB to a file opened for appending).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["AuditLog", "note", "PROMPT_FIELDS", "outcome"]

logger = logging.getLogger("raydb.audit")

PROMPT_FIELDS = ("prompt", "negative_prompt", "instance_prompt", "class_prompt")
_MAX_VALUE_CHARS = 512  # a noted value is cut here: the line stays one small write
_STOP = object()


def outcome(status: int | None) -> str:
    """``ok`` / ``refused`` / ``failed`` of an HTTP status (None: no answer was sent)."""
    if status is None or status >= 500:
        return "failed"
    return "refused" if status >= 400 else "ok"


def note(scope_or_request: Any, **fields: Any) -> None:
    """Add ``fields`` to the audit line of the request being answered (a Starlette ``Request`` or
    its ASGI scope); nothing happens outside the gate (a plain test app)."""
    scope = getattr(scope_or_request, "scope", scope_or_request)
    notes = scope.get("raydb.audit")
    if notes is not None:
        notes.update(fields)


class AuditLog:
    """Formats and writes audit lines (``record``); ``directory`` None: the logger only."""

    def __init__(self, directory: str | None, *, prompts: bool = False, max_pending: int = 10_000) -> None:
        self.directory = Path(directory) if directory else None
        self.prompts = prompts
        self.dropped = 0
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._writer: threading.Thread | None = None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._writer = threading.Thread(target=self._write_loop, name="raydb-audit", daemon=True)
            self._writer.start()

    def line(self, *, tenant: str | None, caller: str, client: str | None, method: str, path: str,
             status: int | None, duration_s: float, notes: dict[str, Any] | None = None,
             now: float | None = None) -> dict[str, Any]:
        """The audit line of one request (prompts dropped unless ``prompts``; long values cut)."""
        stamp = time.gmtime(now if now is not None else time.time())
        millis = int(((now if now is not None else time.time()) % 1) * 1000)
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", stamp) + f".{millis:03d}Z",
            "tenant": tenant, "caller": caller, "client": client, "method": method,
            "path": path[:_MAX_VALUE_CHARS], "status": status, "outcome": outcome(status),
            "duration_ms": round(duration_s * 1000),
        }
        for key, value in (notes or {}).items():
            if key in out or (key in PROMPT_FIELDS and not self.prompts):
                continue
            out[key] = value[:_MAX_VALUE_CHARS] if isinstance(value, str) else value
        return out

    def record(self, line: dict[str, Any]) -> None:
        """Log ``line`` and queue it for ``<tenant>.jsonl`` (dropped, and counted, when the writer
        is ``max_pending`` lines behind)."""
        text = json.dumps(line, separators=(",", ":"), default=str)
        logger.info(text)
        if self._writer is None:
            return
        try:
            self._queue.put_nowait((line["tenant"], text))
        except queue.Full:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                logger.warning("audit log writer is behind: %d lines not written to %s", self.dropped,
                               self.directory)

    def file_of(self, tenant: str | None) -> Path:
        """``<directory>/<tenant>.jsonl``; callers without a tenant share ``_anonymous.jsonl``."""
        assert self.directory is not None
        return self.directory / f"{tenant or '_anonymous'}.jsonl"

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                tenant, text = item
                with open(self.file_of(tenant), "a", encoding="utf-8") as f:
                    f.write(text + "\n")
            except OSError as exc:
                logger.warning("could not append to the audit log: %s", exc)
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Wait until every queued line is written (tests, shutdown)."""
        if self._writer is not None:
            self._queue.join()

    def close(self) -> None:
        if self._writer is not None:
            self._queue.put(_STOP)
            self._writer.join(timeout=10)
            self._writer = None
