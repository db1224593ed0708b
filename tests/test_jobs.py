"""``ray job submit`` of the whole pipeline against a real ``ray start --head`` cluster with token auth.

The cluster is this test's own: a short temp dir, free ports for every listener, and it is stopped
by signalling the ``ray start --block`` process (which takes its children down) and then killing
whatever still names the temp dir — never ``ray stop``, which would stop every cluster on the
machine (including the in-process one of tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from raydb.registry import latest_version
from raydb.storage import Storage

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXCLUDES = [".venv", ".git", "workspace", "demo-output", "**/__pycache__", "*.egg-info",
            ".pytest_cache", ".ruff_cache"]


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _cluster_env(token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_V2_ENABLED="1")
    return env


def _ray(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _http_status(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def _stop_cluster(proc: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM ``ray start --block`` (it stops its processes), then kill leftovers of *this* cluster."""
    import psutil

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and temp_dir in " ".join(p.info["cmdline"] or []):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _job_status(dash: str, sub_id: str, token: str) -> str:
    """The job's status from the Jobs REST API (what ``ray job status`` asks, without a process)."""
    req = urllib.request.Request(f"{dash}/api/jobs/{sub_id}", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())["status"]
    except OSError:
        return ""


def _submit_and_wait(dash: str, env: dict[str, str], sub_id: str, entry: list[str],
                     deadline: float) -> str:
    # No env_vars here: the cluster's environment already has them, and raydb's init_ray passes its
    # own, which Ray refuses to merge with the job's when keys overlap.
    runtime_env = {"excludes": EXCLUDES}
    out = _ray(["job", "submit", "--address", dash, "--submission-id", sub_id, "--working-dir", ".",
                "--runtime-env-json", json.dumps(runtime_env), "--no-wait", "--", *entry], env)
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
    token = secrets.token_hex(32)
    env = _cluster_env(token)
    temp_dir = tempfile.mkdtemp(prefix="rjt-", dir="/tmp")  # short: Ray's socket paths have a limit
    workspace = Path(temp_dir) / "ws"
    gcs, dash, client, node, objm, agent_http, agent_grpc, rt_env, metrics = _free_ports(9)
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(gcs), "--num-cpus", "8", "--num-gpus", "0", "--temp-dir", temp_dir,
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--ray-client-server-port", str(client), "--node-manager-port", str(node),
         "--object-manager-port", str(objm), "--dashboard-agent-listen-port", str(agent_http),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(rt_env),
         "--metrics-export-port", str(metrics), "--disable-usage-stats"],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    dash_url = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 480  # generous: the 2 shared cores are often overloaded
    try:
        while _http_status(f"{dash_url}/api/version", token) != 200:
            assert proc.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline - 400, "the dashboard did not come up"
            time.sleep(2)
        assert _http_status(f"{dash_url}/api/jobs/", None) == 401  # token auth is on

        entry = ["python", "jobs/pipeline.py", "--config", "jobs/configs/pipeline-test.yaml",
                 f"workspace={workspace}", f"model.cache_dir={Path(temp_dir) / 'models'}",
                 "prior.num_class_images=2", "train.max_steps=2"]
        logs = _submit_and_wait(dash_url, env, "raydb-pipeline-1", entry, deadline)
        assert _summary_rows(logs) == {"prior": "ran", "encode": "ran", "train": "ran", "register": "ran"}
        latest = latest_version(Storage(), str(workspace), "jobs-demo")  # records hold no paths
        assert latest["version"] == "v0001"
        meta = json.loads((Path(latest["uri"]) / "adapter.json").read_text())
        assert meta["subject_id"] == "jobs-demo" and meta["metrics"]["steps"] == 2
        assert (Path(latest["uri"]) / "pytorch_lora_weights.safetensors").stat().st_size > 0

        logs = _submit_and_wait(dash_url, env, "raydb-pipeline-2", entry, deadline)
        assert _summary_rows(logs) == dict.fromkeys(("prior", "encode", "train", "register"), "skipped")
        summary = json.loads([ln for ln in logs.splitlines() if ln.startswith('{"subject"')][-1])
        assert summary["registered"] == latest["uri"]
        assert latest_version(Storage(), str(workspace), "jobs-demo") == latest
        on_disk = json.loads((workspace / "pipeline" / "jobs-demo" / "summary.json").read_text())
        assert [s["status"] for s in on_disk["stages"]] == ["skipped"] * 4
    finally:
        _stop_cluster(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
