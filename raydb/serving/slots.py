"""Which adapter lives in which engine slot: load = verify + copy into a free slot (no Ray).

Ray Serve's multiplexer keeps ``serve.max_num_models_per_replica`` adapters and evicts the least
recently used by calling :class:`~raydb.serving.adapters.LoadedAdapter`'s ``__del__``; a request
that still holds the evicted adapter (queued for the next batch) keeps its slot until it releases
it. So an engine has more slots than resident adapters — ``max_num_models_per_replica`` plus one
batch of evicted-but-in-use adapters — and a load that still finds every slot taken waits for one
(up to ``wait_s``) instead of failing or overwriting a slot a request uses.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from typing import Any

from raydb.metrics import record
from raydb.serving.adapters import AdapterError, AdapterGone, FailureCache, LoadedAdapter, read_adapter
from raydb.serving.engine import DiffusionEngine
from raydb.serving.multi_lora import parse_adapter
from raydb.storage import Storage

__all__ = ["SlotPool"]


class SlotPool:
    """Adapters resident in a :class:`DiffusionEngine`'s slots; what Serve's multiplexer loads and evicts."""

    def __init__(self, engine: DiffusionEngine, wait_s: float = 60.0, failure_ttl_s: float = 10.0) -> None:
        self.engine = engine
        self.identity = engine.identity
        self.wait_s = wait_s
        self.failures = FailureCache(failure_ttl_s)
        self._staged: OrderedDict[str, tuple[Any, Any]] = OrderedDict()
        self._live: weakref.WeakValueDictionary[str, LoadedAdapter] = weakref.WeakValueDictionary()
        self._free = list(range(engine.num_slots))
        self._used: dict[int, LoadedAdapter] = {}
        self._changed = threading.Condition()
        self.loads = 0
        self.unloads = 0

    def _verified(self, storage: Storage, version_uri: str) -> tuple[Any, Any]:
        """``(adapter.json, parsed LoRA)`` of an adapter the engine can hold; AdapterError if not."""
        meta, state, lora_config = read_adapter(storage, version_uri, self.identity, self.engine.family)
        parsed = parse_adapter(state, lora_config)
        self.engine.check_adapter(parsed)
        return meta, parsed

    def is_resident(self, adapter_id: str) -> bool:
        """Whether the multiplexer holds ``adapter_id`` (loaded and not evicted)."""
        with self._changed:
            return adapter_id in self._live

    def stage(self, storage: Storage, version_uri: str, adapter_id: str) -> None:
        """Validate an adapter *before* it enters the multiplexer (which evicts before it loads);
        :meth:`load` then uses it. Raises the (possibly cached) AdapterError, evicting nothing."""
        cached = self.failures.get(adapter_id)
        if cached is not None:
            raise cached
        try:
            staged = self._verified(storage, version_uri)
        except AdapterError as exc:
            self.failures.put(adapter_id, exc)
            record("raydb_adapter_loads_total", result="failed")
            raise
        with self._changed:
            self._staged[adapter_id] = staged
            while len(self._staged) > 4:  # requests racing for new adapters: keep a few, not all
                self._staged.popitem(last=False)

    def evicted(self, adapter: LoadedAdapter) -> None:
        """The multiplexer let ``adapter`` go: the next request for its id is staged again."""
        with self._changed:
            if self._live.get(adapter.adapter_id) is adapter:
                del self._live[adapter.adapter_id]
                record("raydb_adapter_evictions_total")

    def load(self, storage: Storage, version_uri: str, subject_id: str, version: str) -> LoadedAdapter:
        """Copy a verified adapter (staged, else read and verified here) into a free slot.
        ``subject_id@version`` is the multiplexed model id (the ingress names subjects with their
        tenant, ``<tenant>/<subject>``: subject ids are per tenant)."""
        start = time.perf_counter()
        with self._changed:
            staged = self._staged.pop(f"{subject_id}@{version}", None)
        meta, parsed = staged or self._verified(storage, version_uri)
        with self._changed:
            if not self._changed.wait_for(lambda: self._free, timeout=self.wait_s):
                raise AdapterGone(f"no free adapter slot within {self.wait_s:.0f}s "
                                  "(every slot is in use by queued requests); retry")
            slot = self._free.pop(0)
        try:
            self.engine.write_slot(slot, parsed)
        except Exception:
            self._give_back(slot)
            record("raydb_adapter_loads_total", result="failed")
            raise
        adapter = LoadedAdapter(self, f"slot{slot}", subject_id, version, meta, slot=slot)
        with self._changed:
            self._used[slot] = adapter
            self._live[adapter.adapter_id] = adapter
            self.loads += 1
        record("raydb_adapter_loads_total", result="loaded")
        record("raydb_adapter_load_seconds", time.perf_counter() - start)
        self._record_slots()
        return adapter

    def unload(self, adapter: LoadedAdapter) -> None:
        """Free the adapter's slot (its weights stay until overwritten: no request routes to it)."""
        assert adapter.slot is not None
        with self._changed:
            if self._used.get(adapter.slot) is not adapter:
                return
            del self._used[adapter.slot]
            self.unloads += 1
        self._give_back(adapter.slot)
        self._record_slots()

    def _record_slots(self) -> None:
        with self._changed:
            occupied = len(self._used)
        record("raydb_adapter_slots", occupied, state="occupied")
        record("raydb_adapter_slots", self.engine.num_slots, state="total")

    def _give_back(self, slot: int) -> None:
        with self._changed:
            self._free.append(slot)
            self._changed.notify_all()

    def resident(self) -> list[str]:
        """``<subject>@<version>`` of the adapters in slots."""
        with self._changed:
            return sorted(f"{a.subject_id}@{a.version}" for a in self._used.values())

    def stats(self) -> dict[str, Any]:
        return {"resident": self.resident(), "loads": self.loads, "unloads": self.unloads,
                "base_model": self.identity, "unet_forwards": self.engine.unet_forwards}
