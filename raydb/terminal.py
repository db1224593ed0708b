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
import io
import logging
import os
import re
import sys
import threading
from typing import TextIO

__all__ = ["add_console_flags", "setup_console", "library_env", "is_verbose", "show_progress",
           "filter_known_noise", "KNOWN_NOISE", "LEVELS", "QUIET_LOGGERS"]

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_VERBOSE_ENV = "RAYDB_VERBOSE"  # set by setup_console: read where Ray and the stages are started
QUIET_LOGGERS = ("ray.data", "ray.tune", "ray.train", "ray.serve", "transformers", "diffusers")


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


class _AtLeast(logging.Filter):
    """Lets through records at ``level`` and above."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler on whatever ``sys.stderr`` is at the time of each record (it may be
    replaced by :func:`filter_known_noise` after the handler is made)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # StreamHandler.__init__ sets it; sys.stderr wins
        pass


def setup_console(level: str = "INFO", *, verbose: bool = False) -> None:
    """Send the ``raydb`` logger to stderr at ``level``; hold the libraries at WARNING unless
    ``verbose``. Called once by the CLI; calling it again replaces the handler (tests)."""
    logger = logging.getLogger("raydb")
    logger.setLevel(level)
    for handler in [h for h in logger.handlers if getattr(h, "_raydb_console", False)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    handler._raydb_console = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    os.environ[_VERBOSE_ENV] = "1" if verbose else "0"
    for key in _QUIET_ENV:
        os.environ.pop(key, None)
    os.environ.update(library_env())
    for name in QUIET_LOGGERS:
        lib = logging.getLogger(name)
        for old in [f for f in lib.filters if isinstance(f, _AtLeast)]:
            lib.removeFilter(old)
        if not verbose:  # a filter, not a level: Ray Serve and Ray Data reset their loggers' levels
            # when first imported, which happens after this. Ray Data's warnings are ours to decide
            # ("Progress bars disabled"), so it is held at ERROR.
            lib.addFilter(_AtLeast(logging.ERROR if name == "ray.data" else logging.WARNING))


def is_verbose() -> bool:
    """Whether the libraries may print their own progress (``--verbose``; True outside the CLI, so
    a library user or a test sees everything, as without raydb)."""
    return os.environ.get(_VERBOSE_ENV, "1") != "0"


def library_env() -> dict[str, str]:
    """Environment variables that set the libraries' verbosity, for this process and Ray's workers
    (empty when verbose). transformers and diffusers read theirs at import; tqdm (>= 4.66) reads
    ``TQDM_DISABLE`` for every bar, which covers diffusers' sampling and the hub's downloads."""
    return {} if is_verbose() else dict(_QUIET_ENV)


_QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "RAY_DATA_LOG_LEVEL": "ERROR",
    # Tune's newer reporter prints its experiment header at any verbosity; the classic one honours
    # RunConfig(verbose=0)
    "RAY_AIR_NEW_OUTPUT": "0",
}


def show_progress() -> bool:
    """Whether raydb's own progress bars show: with --verbose, or when a person watches stderr (a
    terminal redraws a bar in place; a log file would get one line per redraw)."""
    return is_verbose() or sys.stderr.isatty()


# Lines Ray writes to the driver's terminal that are false alarms in a healthy run. Without
# --verbose they are dropped from the terminal only; Ray's log files under /tmp/ray keep them.
KNOWN_NOISE = (
    # Ray core (C++), at ERROR level, for EVERY Ray Data actor pool: Ray Data passes its context and
    # transform as object refs to its map actors, which Ray flags as a restart risk
    # (ray-project/ray#57733: the refs are held for the dataset's whole run, so restarts work).
    re.compile(r"core_worker\.cc:\d+: Actor with class name: 'MapWorker\(.*has constructor arguments in the "
               r"object store and max_restarts > 0"),
    # The raylet's note that it started more Python workers than the machine has cores, which a
    # pipeline with Ray Data actors, Train workers and Tune trials on a 2-core laptop always does.
    re.compile(r"\(raylet\).*WARNING: \d+ PYTHON worker processes have been started on node"),
    # serve.shutdown() kills the controller while its own graceful-shutdown call is in flight.
    re.compile(r"\(raylet\).*Task ServeController\.graceful_shutdown failed.*killed by `ray\.kill`"),
)

_FILTERING = False


class _LineFilter(io.TextIOBase):
    """A text stream that passes whole lines on to ``out`` unless one of ``patterns`` matches."""

    def __init__(self, out: TextIO, patterns: tuple[re.Pattern[str], ...]) -> None:
        self._out, self._patterns, self._pending = out, patterns, ""
        self._lock = threading.Lock()

    def _keep(self, line: str) -> bool:
        return not any(p.search(line) for p in self._patterns)

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._pending = (self._pending + text).split("\n")
            kept = "".join(line + "\n" for line in lines if self._keep(line))
            if kept:
                self._out.write(kept)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._pending and self._keep(self._pending):  # a progress bar's "\r" redraw
                self._out.write(self._pending)
            self._pending = ""
            self._out.flush()

    def isatty(self) -> bool:
        return self._out.isatty()

    def fileno(self) -> int:
        return self._out.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._out.encoding


def filter_known_noise(patterns: tuple[re.Pattern[str], ...] = KNOWN_NOISE) -> None:
    """Drop lines matching ``patterns`` from what this process prints; everything else passes
    through unchanged and in order.

    Python-level writes (``print``, logging, Ray's relay of its daemons' messages) go through
    :class:`_LineFilter` wrappers that replace ``sys.stdout`` / ``sys.stderr`` and write straight to
    the terminal, so stdout and stderr keep their order. What Ray's C++ core writes to file
    descriptor 2 goes through a pipe that a daemon thread filters; at exit the descriptor is put
    back and the thread drained, so no line is lost.
    """
    global _FILTERING
    if _FILTERING:
        return
    _FILTERING = True
    sys.stdout.flush()
    sys.stderr.flush()
    terminal_err = os.fdopen(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding, errors="replace")
    sys.stdout = _LineFilter(sys.stdout, patterns)  # type: ignore[assignment]
    sys.stderr = _LineFilter(terminal_err, patterns)  # type: ignore[assignment]
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    pump = threading.Thread(target=_pump, args=(read_end, original, patterns), daemon=True,
                            name="raydb-console-fd2")
    pump.start()

    def restore() -> None:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os.dup2(original, 2)  # our end of the pipe closes: the pump reads to EOF and stops
        pump.join(timeout=2)  # a child that inherited the pipe may hold it open: don't hang

    atexit.register(restore)


def _pump(read_end: int, out: int, patterns: tuple[re.Pattern[str], ...]) -> None:
    pending = b""
    while True:
        chunk = os.read(read_end, 65536)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        kept = [line + b"\n" for line in lines
                if not any(p.search(line.decode(errors="replace")) for p in patterns)]
        if kept:
            _write_all(out, b"".join(kept))
    if pending and not any(p.search(pending.decode(errors="replace")) for p in patterns):
        _write_all(out, pending)


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:  # the reader of our original output left (a closed pipe): nothing to tell
        pass
