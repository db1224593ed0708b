"""raydb's series (raydb/metrics.py): one list, checked tags, best effort; documented (no Ray)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from raydb import metrics
from raydb.metrics import SERIES, record

ROOT = Path(__file__).resolve().parents[1]


def test_every_series_is_named_documented_and_described():
    doc = (ROOT / "docs" / "operations.md").read_text()
    for name, spec in SERIES.items():
        assert re.fullmatch(r"raydb_[a-z_]+", name), name
        assert (spec.kind == "counter") == name.endswith("_total"), name
        assert f"ray_{name}" in doc, f"docs/operations.md does not document ray_{name}"
        assert spec.where in ("serve", "ray") and spec.description
        assert (spec.kind == "histogram") == bool(spec.boundaries)
        assert list(spec.boundaries) == sorted(spec.boundaries)


def test_tags_must_be_exactly_the_series_tags():
    with pytest.raises(ValueError, match="raydb_adapter_loads_total"):
        record("raydb_adapter_loads_total", reslt="loaded")
    with pytest.raises(KeyError):
        record("raydb_no_such_series")


def test_recording_reaches_the_metric_and_a_failing_backend_never_raises(monkeypatch):
    calls = []

    class Fake:
        def inc(self, value, tags):
            calls.append(("inc", value, tags))

        def observe(self, value, tags):
            raise RuntimeError("metrics agent gone")

    monkeypatch.setitem(metrics._made, "raydb_adapter_loads_total", Fake())
    monkeypatch.setitem(metrics._made, "raydb_adapter_load_seconds", Fake())
    record("raydb_adapter_loads_total", result="failed")
    record("raydb_adapter_load_seconds", 0.3)  # raises inside: swallowed
    assert calls == [("inc", 1.0, {"result": "failed"})]


def test_the_dashboard_plots_every_series_and_only_known_ones():
    import json

    dash = json.loads((ROOT / "deploy" / "monitoring" / "grafana-dashboard.json").read_text())
    doc = (ROOT / "docs" / "operations.md").read_text()
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    names = {name for e in exprs for name in re.findall(r"ray_[a-z_]+", e)}
    used = {re.sub(r"_(bucket|sum|count)$", "", name) for name in names}
    ours = {name[len("ray_"):] for name in used if name.startswith("ray_raydb_")}
    assert ours == set(SERIES), "series without a panel, or a panel on no series"
    assert all(name in doc for name in used if not name.startswith("ray_raydb_"))
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
