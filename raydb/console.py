"""What a person at a terminal sees: raydb's own lines, and the libraries under it kept quiet.

raydb's progress lines (a stage started, a trial finished, where an artifact is) go through the
``raydb`` logger: one line each, on stderr, so stdout keeps only a verb's result (the JSON summary
line, ``raydb config``'s YAML) and can be piped. ``--log-level`` / ``--quiet`` choose how much of it
shows. The libraries raydb drives — Ray Data's progress bars and execution plans, Ray Tune's trial
tables, transformers' and diffusers' warnings and progress bars — print a great deal that says
nothing to someone training a subject; by default they are held at WARNING (``--verbose`` lets
them speak). Their settings travel to Ray's workers as environment variables
(:func:`library_env`), because most of that output is printed inside workers, not in the driver.
"""

from __future__ import annotations

import argparse
import atexit
import logging
import os
import re
import sys
import threading

__all__ = ["add_console_flags", "setup_console", "library_env", "is_verbose", "filter_known_noise",
           "KNOWN_NOISE", "LEVELS", "QUIET_LOGGERS"]

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_VERBOSE_ENV = "RAYDB_VERBOSE"  # set by setup_console: read where Ray and the stages are started
QUIET_LOGGERS = ("ray.data", "ray.tune", "ray.train", "transformers", "diffusers")


def add_console_flags(parser: argparse.ArgumentParser) -> None:
    """``--log-level``, ``--quiet`` and ``--verbose`` on a verb's parser."""
    group = parser.add_argument_group("output")
    group.add_argument("--log-level", choices=LEVELS, default="INFO", type=str.upper,
                       help="raydb's own lines at this level and above (default: INFO)")
    group.add_argument("--quiet", "-q", dest="log_level", action="store_const", const="WARNING",
                       help="only warnings and errors (same as --log-level WARNING)")
    group.add_argument("--verbose", "-v", action="store_true",
                       help="also the libraries' own output: Ray Tune's tables, Ray Data's progress, "
                            "transformers and diffusers")


class _Formatter(logging.Formatter):
    """INFO lines as they are; anything else says its level (``WARNING: ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info and record.levelno >= logging.ERROR:
            text += "\n" + self.formatException(record.exc_info)
        return text if record.levelno == logging.INFO else f"{record.levelname}: {text}"


def setup_console(level: str = "INFO", *, verbose: bool = False) -> None:
    """Send the ``raydb`` logger to stderr at ``level``; hold the libraries at WARNING unless
    ``verbose``. Called once by the CLI; calling it again replaces the handler (tests)."""
    logger = logging.getLogger("raydb")
    logger.setLevel(level)
    for handler in [h for h in logger.handlers if getattr(h, "_raydb_console", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    handler._raydb_console = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    os.environ[_VERBOSE_ENV] = "1" if verbose else "0"
    os.environ.update(library_env())
    if not verbose:
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def is_verbose() -> bool:
    """Whether the libraries may print their own progress (``--verbose``; True outside the CLI, so
    a library user or a test sees everything, as without raydb)."""
    return os.environ.get(_VERBOSE_ENV, "1") != "0"


def library_env() -> dict[str, str]:
    """Environment variables that set the libraries' verbosity, for this process and Ray's workers
    (empty when verbose). transformers and diffusers read theirs at import; tqdm (>= 4.66) reads
    ``TQDM_DISABLE`` for every bar, which covers diffusers' sampling and the hub's downloads."""
    if is_verbose():
        return {}
    return {"TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1",
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "RAY_DATA_LOG_LEVEL": "WARNING"}


# Lines Ray's own processes write straight to the driver's file descriptors (not through a Python
# logger that a level could hold back) and that are false alarms in a healthy run. Each is dropped
# from the terminal only, without --verbose; Ray's log files under /tmp/ray keep them.
KNOWN_NOISE = (
    # Ray core, written at ERROR level for EVERY Ray Data actor pool: Ray Data passes its context and
    # transform as object refs to its map actors, which Ray flags as a restart risk
    # (ray-project/ray#57733: the refs are held for the dataset's whole run, so restarts work).
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(.*has constructor arguments in the "
               rb"object store and max_restarts > 0"),
    # The raylet's note that it started more Python workers than the machine has cores, which a
    # pipeline with Ray Data actors, Train workers and Tune trials on a 2-core laptop always does.
    re.compile(rb"\(raylet\).*WARNING: \d+ PYTHON worker processes have been started on node"),
)


_FILTERING = False


def filter_known_noise(patterns: tuple[re.Pattern[bytes], ...] = KNOWN_NOISE) -> None:
    """Drop lines matching ``patterns`` from this process's stdout and stderr (file descriptors 1
    and 2, so also what Ray's C++ core writes); everything else passes through unchanged, in order.

    Each descriptor is replaced by a pipe that a daemon thread copies, line by line, to the original.
    At exit the originals are put back and the threads drained, so no line is lost.
    """
    global _FILTERING
    if _FILTERING:
        return
    _FILTERING = True
    pumps: list[tuple[int, int, threading.Thread]] = []
    for fd in (1, 2):
        (sys.stdout if fd == 1 else sys.stderr).flush()
        original = os.dup(fd)
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        thread = threading.Thread(target=_pump, args=(read_end, original, patterns), daemon=True,
                                  name=f"raydb-console-{fd}")
        thread.start()
        pumps.append((fd, original, thread))

    def restore() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for fd, original, thread in pumps:
            os.dup2(original, fd)  # our end of the pipe closes: the pump reads to EOF and stops
            thread.join(timeout=2)  # a child that inherited the pipe may hold it open: don't hang

    atexit.register(restore)


def _pump(read_end: int, out: int, patterns: tuple[re.Pattern[bytes], ...]) -> None:
    pending = b""
    while True:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        kept = [line + b"\n" for line in lines if not any(p.search(line) for p in patterns)]
        if kept:
            _write_all(out, b"".join(kept))
    if pending and not any(p.search(pending) for p in patterns):
        _write_all(out, pending)


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:  # the reader of our original output left (a closed pipe): nothing to tell
        pass
