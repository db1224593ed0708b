"""A private ``ray start --head`` cluster with token auth, for tests that need the Jobs API.

The cluster is the test's own: a short temp dir, free ports for every listener (including the
dashboard agent's, whose default 52365 another cluster on a shared machine may hold — then the Jobs
API answers "No available agent"), and it is stopped by killing the ``ray start --block`` process
group (its children with it) and then whatever still names the temp dir — never
``ray stop``, which would stop every cluster on the machine (including the in-process one of
tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from raydb.cluster import free_ports

REPO = Path(__file__).resolve().parents[2]
# Ray Train's controller polls its worker group every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S): a
# test's 2-step run waited on that poll to see its workers done, ~2 s of a ~15 s fit here (measured:
# 15.2 s vs 13.0 s per warm fit). Every test cluster (this one and tests/conftest.py's) polls every
# 0.5 s; nothing else changes.
TRAIN_POLL_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
BIN = Path(sys.executable).parent


@dataclass
class HeadCluster:
    env: dict[str, str]  # the cluster's environment (token included): give it to every subprocess
    token: str
    dashboard: str  # http://127.0.0.1:<port>: the Jobs API
    gcs: str  # 127.0.0.1:<port>: ray.init / RAY_ADDRESS
    temp_dir: str


def cluster_env(token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_V2_ENABLED="1", **TRAIN_POLL_ENV)
    return env


def http_status(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def job_info(dashboard: str, sub_id: str, token: str) -> dict:
    """The job's record from the Jobs REST API (what ``ray job status`` asks), {} when unknown."""
    req = urllib.request.Request(f"{dashboard}/api/jobs/{sub_id}",
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())
    except OSError:
        return {}


def _stop(proc: subprocess.Popen, temp_dir: str) -> None:
    import psutil

    # no graceful stop (SIGTERM: Serve drains, the node shuts down in order, ~30 s of the suite's time
    # per cluster): the test is over and the cluster is its own, so its process group goes at once
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and temp_dir in " ".join(p.info["cmdline"] or []):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


@contextlib.contextmanager
def head_cluster(num_cpus: int = 8, prefix: str = "rjt-", boot_s: float = 80) -> Iterator[HeadCluster]:
    """Start the cluster, wait for its dashboard (token auth checked), yield it, stop it."""
    token = secrets.token_hex(32)
    env = cluster_env(token)
    temp_dir = tempfile.mkdtemp(prefix=prefix, dir="/tmp")  # short: Ray's socket paths have a limit
    gcs, dash, client, node, objm, agent_http, agent_grpc, rt_env, metrics = free_ports(9)
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
         "--port", str(gcs), "--num-cpus", str(num_cpus), "--num-gpus", "0", "--temp-dir", temp_dir,
         "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
         "--ray-client-server-port", str(client), "--node-manager-port", str(node),
         "--object-manager-port", str(objm), "--dashboard-agent-listen-port", str(agent_http),
         "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(rt_env),
         "--metrics-export-port", str(metrics), "--disable-usage-stats"],
        env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    cluster = HeadCluster(env, token, f"http://127.0.0.1:{dash}", f"127.0.0.1:{gcs}", temp_dir)
    deadline = time.monotonic() + boot_s  # generous: the 2 shared cores are often overloaded
    try:
        # the dashboard, then its agent on this node (which runs jobs: until it answers, the Jobs API
        # says "No available agent to submit job")
        for url in (f"{cluster.dashboard}/api/version", f"http://127.0.0.1:{agent_http}/"):
            while http_status(url, token) == 0:
                assert proc.poll() is None, "ray start --head exited"
                assert time.monotonic() < deadline, f"{url} did not come up"
                time.sleep(2)
        assert http_status(f"{cluster.dashboard}/api/jobs/", None) == 401  # token auth is on
        yield cluster
    finally:
        _stop(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def run_job(cluster: HeadCluster, argv: list[str], sub_id: str, deadline: float) -> dict:
    """Run ``argv`` as a Ray job through the Jobs REST API and wait for it; its record on success.

    A job's driver runs inside the cluster (the supervisor gives it the address), which is sturdier
    on a loaded machine than a driver connecting from outside.
    """
    import shlex

    body = json.dumps({"entrypoint": shlex.join(argv), "submission_id": sub_id}).encode()
    req = urllib.request.Request(f"{cluster.dashboard}/api/jobs/", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {cluster.token}",
                                          "Content-Type": "application/json"})
    while True:
        try:
            with urllib.request.urlopen(req, timeout=30):
                break
        except OSError as exc:  # e.g. "No available agent" while the agent registers, or a busy dashboard
            assert time.monotonic() < deadline, f"job {sub_id} not accepted: {exc}"
            time.sleep(2)
    while (info := job_info(cluster.dashboard, sub_id, cluster.token)).get("status") not in (
            "SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"job {sub_id} still {info.get('status')}"
        time.sleep(1)
    if info["status"] != "SUCCEEDED":
        logs = urllib.request.Request(f"{cluster.dashboard}/api/jobs/{sub_id}/logs",
                                      headers={"Authorization": f"Bearer {cluster.token}"})
        with urllib.request.urlopen(logs, timeout=30) as resp:
            raise AssertionError(f"job {sub_id}: {info['status']}\n{json.loads(resp.read())['logs'][-4000:]}")
    return info
