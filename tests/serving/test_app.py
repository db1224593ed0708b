"""The Serve builder ships in the package: ``serve run raydb.serving.app:build_app`` from a wheel.

The wheel is built from a copy of this tree's package sources (building in the checkout would
reuse a stale ``build/lib`` and ship modules that no longer exist) with this environment's
setuptools (no isolated build environment to set up), and installed into a scratch virtualenv that
sees this one's dependencies (a ``.pth`` line) but not this checkout: the command runs in an empty
folder with no ``PYTHONPATH``, so ``raydb`` can only come from the wheel. What costs time is
``serve run`` starting a Ray cluster and Serve of its own, which is the point of the test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from raydb.cluster import free_port

REPO = Path(__file__).resolve().parents[2]


def _wheel_venv(tmp: Path) -> Path:
    """A scratch venv holding only the raydb wheel; its python finds the other packages here."""
    src, wheels = tmp / "src", tmp / "wheels"
    shutil.copytree(REPO / "raydb", src / "raydb", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", *(p.name for p in REPO.glob("LICEN[CS]E*"))):
        shutil.copy2(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(src)], check=True, timeout=600,
                   env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    (wheel,) = wheels.glob("raydb-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; "
                                "print(sysconfig.get_paths()['purelib'])"], check=True, capture_output=True,
                               text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target",
                    str(site), str(wheel)], check=True, timeout=300)
    # dependencies from this environment, after the wheel (a plain path: its .pth files, such as an
    # editable install of raydb, are not processed)
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed, tree = (sorted(p.relative_to(root).as_posix() for p in (root / "raydb").rglob("*")
                              if p.is_file() and "__pycache__" not in p.parts) for root in (site, REPO))
    # the tree's modules and package data (the console's files, the digits model), no more (a stale
    # build/lib), no fewer (a file package-data misses)
    assert installed == tree
    return venv


@pytest.mark.ray
@pytest.mark.slow
def test_serve_run_of_the_packaged_builder_from_a_wheel(tmp_path):
    venv = _wheel_venv(tmp_path)
    python = str(venv / "bin" / "python")
    run_dir = tmp_path / "elsewhere"  # not the checkout: nothing to import raydb from but the wheel
    run_dir.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "RAY_SERVE_HTTP_HOST": "127.0.0.1"}
    where = subprocess.run([python, "-c", "import raydb.serving.app as m; print(m.__file__)"], cwd=run_dir,
                           env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert where.startswith(str(venv)), where

    port = free_port("127.0.0.1")
    config = tmp_path / "raydb.yaml"
    config.write_text(yaml.safe_dump({
        "workspace": str(tmp_path / "ws"),
        "model": {"pretrained": "tiny", "cache_dir": str(tmp_path / "cache")},
        "serve": {"auth": "none", "port": port, "num_cpus_per_replica": 1, "console": True},
    }))
    serve_config = tmp_path / "serve.yaml"
    serve_config.write_text(yaml.safe_dump({
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "raydb", "route_prefix": "/", "import_path": "raydb.serving.app:build_app",
                          "args": {"config": str(config)}}],
    }))
    serve_cli = "import sys; from ray.serve.scripts import cli; sys.exit(cli())"
    proc = subprocess.Popen([python, "-c", serve_cli, "run", str(serve_config)], cwd=run_dir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 420
        status = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
                    status = resp.status
                    break
            except OSError:
                time.sleep(2)
        assert status == 200, f"serve run never answered /healthz; it said:\n{_output(proc)}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ui/", timeout=30) as resp:  # package data
            assert resp.status == 200 and b"<html" in resp.read().lower()
    finally:
        # no graceful Serve shutdown (it drains the replicas: tens of seconds of the suite's time):
        # serve run and the local Ray it started, all in its process group, go at once
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _output(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    return (proc.communicate(timeout=30)[0] or "")[-4000:]
