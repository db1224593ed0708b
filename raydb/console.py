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
import logging
import os
import sys

__all__ = ["add_console_flags", "setup_console", "library_env", "is_verbose", "LEVELS", "QUIET_LOGGERS"]

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
            "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
