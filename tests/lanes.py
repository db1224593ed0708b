"""``make test``: the whole suite as two pytest processes side by side, each line of their output
prefixed with its lane; exit status 0 only when both lanes pass.

- ``ray``: the Ray tier (``-m ray``), its files one after another on one Ray cluster;
- ``rest``: everything else (``-m "not ray"``), in one single-threaded process.

Why two lanes and not pytest-xdist's scheduling: a Ray file is dozens of processes starting up
(Train's controller and workers, Tune's trials, Serve's replicas, Ray Data's actors), and two Ray
files at once on 2 cores took far longer than one after the other. Measured here: with xdist's two
processes each taking Ray files, tune/test_stage.py took 822 s and the HTTP training test 570 s
(166 s and 62 s alone), and ``make test`` 42 min (with other work beside it); with these lanes,
18 min (the Ray lane 1071 s, the rest 325 s). xdist hands out whole files, so it cannot keep the
Ray files in one process while the other takes the rest (``--dist loadgroup`` would, but its
groups are silently ignored with pytest 9.2: pytest-xdist issue #1386). The Ray lane waits on
process start-up and polling much of the time; the other lane fills those gaps.

Usage: ``python tests/lanes.py [pytest args for both lanes]`` (the Makefile adds ``--durations``).
Each lane gets its own ``--basetemp`` under one fresh temporary folder, removed when both pass and
kept (and named) when one fails.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

# The Ray lane's few tests take a minute or two each: a line per test (-v) says where it is; the
# rest lane's hundreds of quick ones are dots (-q).
LANES = {"ray": ["-v", "-m", "ray"], "rest": ["-q", "-m", "not ray"]}
NO_TESTS = 5  # pytest's exit status when a lane's selection is empty (e.g. a path with no Ray test)


def _pump(name: str, proc: subprocess.Popen, lock: threading.Lock) -> None:
    for line in proc.stdout:
        with lock:
            sys.stdout.write(f"[{name}] {line}")
            sys.stdout.flush()


def main(args: list[str]) -> int:
    base = tempfile.mkdtemp(prefix="raydb-test-")
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    lock = threading.Lock()
    procs, pumps, started = {}, [], time.monotonic()
    for name, select in LANES.items():
        cmd = [sys.executable, "-m", "pytest", f"--basetemp={base}/{name}", *select, *args]
        procs[name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       env=env)
        pumps.append(threading.Thread(target=_pump, args=(name, procs[name], lock), daemon=True))
        pumps[-1].start()
    codes, ended = {}, {}
    try:
        while len(codes) < len(procs):
            for name, proc in procs.items():
                if name not in codes and proc.poll() is not None:
                    codes[name], ended[name] = proc.returncode, time.monotonic() - started
            time.sleep(0.5)
    except KeyboardInterrupt:
        for proc in procs.values():
            proc.terminate()
        raise
    for pump in pumps:
        pump.join(timeout=10)
    ok = all(code in (0, NO_TESTS) for code in codes.values()) and any(c == 0 for c in codes.values())
    print("\nlanes: " + ", ".join(f"{name} exit {codes[name]} after {ended[name]:.0f} s" for name in procs)
          + f"; {'passed' if ok else 'FAILED'} in {time.monotonic() - started:.0f} s")
    if ok:
        shutil.rmtree(base, ignore_errors=True)
    else:
        print(f"the lanes' temporary folders are kept under {base}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
