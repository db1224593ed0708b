"""A stage's driver as a process of its own on the test's Ray cluster, for tests that kill it the way
a lost head-node process or a preempted job dies (SIGKILL, no cleanup)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from raydb.config import RaydbConfig


def start_driver(ray_cluster, cfg: RaydbConfig, folder: Path, call: str,
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    """Run ``call`` (``"raydb.tune.run_tune"``: a function taking ``(cfg, quiet=True)``) for ``cfg``
    in a new process session joined to ``ray_cluster``; ``folder`` holds the config it reads, ``env``
    adds to its environment (a fault plan, ``raydb.faults.ENV``)."""
    cfg_file = folder / "driver-cfg.json"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    module, function = call.rsplit(".", 1)
    script = (
        "import json\n"
        "from raydb.config import load_config\n"
        "from raydb.cluster import init_ray\n"
        f"from {module} import {function}\n"
        f"cfg = load_config(data=json.load(open({str(cfg_file)!r})))\n"
        "init_ray(cfg)\n"
        f"{function}(cfg, quiet=True)\n"
    )
    env = dict(os.environ, **(env or {}), RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    return subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_driver(driver: subprocess.Popen) -> None:
    """SIGKILL the driver's whole session (it and whatever it started), if it still runs."""
    if driver.poll() is None:
        os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
