"""``ray job submit`` of the whole pipeline against a real ``ray start --head`` cluster with token auth
(the test's own: tests/helpers/head_cluster.py)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from raydb.registry import latest_version
from raydb.storage import Storage
from tests.helpers.head_cluster import BIN, REPO, head_cluster, job_info

EXCLUDES = [".venv", ".git", "workspace", "demo-output", "**/__pycache__", "*.egg-info",
            ".pytest_cache", ".ruff_cache"]


def _ray(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _job_status(dash: str, sub_id: str, token: str) -> str:
    return job_info(dash, sub_id, token).get("status", "")


def _submit_and_wait(dash: str, env: dict[str, str], sub_id: str, entry: list[str],
                     deadline: float) -> str:
    # No env_vars here: the cluster's environment already has them, and raydb's init_ray passes its
    # own, which Ray refuses to merge with the job's when keys overlap.
    runtime_env = {"excludes": EXCLUDES}
    while True:
        out = _ray(["job", "submit", "--address", dash, "--submission-id", sub_id, "--working-dir", ".",
                    "--runtime-env-json", json.dumps(runtime_env), "--no-wait", "--", *entry], env)
        if "No available agent" not in out.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)  # the node's agent registers a little after the dashboard answers
    assert out.returncode == 0, out.stdout + out.stderr
    status = ""
    while time.monotonic() < deadline and status not in ("SUCCEEDED", "FAILED", "STOPPED"):
        time.sleep(3)
        status = _job_status(dash, sub_id, env["RAY_AUTH_TOKEN"])
    logs = _ray(["job", "logs", "--address", dash, sub_id], env).stdout
    assert status == "SUCCEEDED", f"job {sub_id}: {status or 'timed out'}\n{logs[-6000:]}"
    return logs


def _summary_rows(logs: str) -> dict[str, str]:
    """``{stage: status}`` from the table after ``pipeline summary:`` in the job's log."""
    lines = logs.splitlines()
    start = max(i for i, line in enumerate(lines) if line.strip() == "pipeline summary:")
    rows = {}
    for line in lines[start + 2:]:
        parts = line.split()
        if len(parts) < 3 or parts[1] not in ("ran", "skipped", "off"):
            break
        rows[parts[0]] = parts[1]
    return rows


@pytest.mark.ray
def test_pipeline_job_submit_registers_then_skips_everything():
    deadline = time.monotonic() + 480  # generous: the 2 shared cores are often overloaded
    with head_cluster(prefix="rjt-") as cluster:
        env, dash_url, workspace = cluster.env, cluster.dashboard, Path(cluster.temp_dir) / "ws"
        temp_dir = cluster.temp_dir
        entry = ["python", "jobs/pipeline.py", "--config", "jobs/configs/pipeline-test.yaml",
                 f"workspace={workspace}", f"model.cache_dir={Path(temp_dir) / 'models'}",
                 "prior.num_class_images=2", "train.max_steps=2"]
        logs = _submit_and_wait(dash_url, env, "raydb-pipeline-1", entry, deadline)
        assert _summary_rows(logs) == {"prior": "ran", "encode": "ran", "train": "ran", "register": "ran"}
        latest = latest_version(Storage(), str(workspace), "demo", "jobs-demo")  # records hold no paths
        assert latest["version"] == "v0001"
        meta = json.loads((Path(latest["uri"]) / "adapter.json").read_text())
        assert meta["subject_id"] == "jobs-demo" and meta["metrics"]["steps"] == 2
        assert (Path(latest["uri"]) / "pytorch_lora_weights.safetensors").stat().st_size > 0

        logs = _submit_and_wait(dash_url, env, "raydb-pipeline-2", entry, deadline)
        assert _summary_rows(logs) == dict.fromkeys(("prior", "encode", "train", "register"), "skipped")
        summary = json.loads([ln for ln in logs.splitlines() if ln.startswith('{"subject"')][-1])
        assert summary["registered"] == latest["uri"]
        assert latest_version(Storage(), str(workspace), "demo", "jobs-demo") == latest
        on_disk = json.loads((workspace / "tenants" / "demo" / "pipeline" / "jobs-demo" / "summary.json")
                             .read_text())
        assert [s["status"] for s in on_disk["stages"]] == ["skipped"] * 4
