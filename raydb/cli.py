"""``raydb`` command line: one verb per pipeline stage, all through ``run_pipeline``.

Every verb takes ``--config FILE`` and then ``key=value`` overrides, e.g.::

    raydb train --config jobs/configs/demo.yaml train.max_steps=60

The stage verbs (``prior``, ``encode``, ``train``, ``tune``, ``pipeline``) are rows of ``VERBS``:
the stages they run and the flags they take. They all call :func:`raydb.pipeline.run_pipeline`, so
a stage's manifest and skipping behave the same whichever verb ran it. Bad input (config, storage,
adapter, a search with no finished trial) ends with one ``raydb <verb>: error: ...`` line, exit 1
(2 for a config error), never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from raydb.config import ConfigError, RaydbConfig, load_config
from raydb.terminal import add_console_flags, setup_console

__all__ = ["main", "VERBS", "Verb", "Flag"]


@dataclass(frozen=True)
class Flag:
    """A command-line switch, passed to ``run_pipeline`` as the keyword ``dest``."""

    name: str
    help: str
    dest: str


@dataclass(frozen=True)
class Verb:
    """A stage verb: the stages it runs (None: the config decides, tune or train) and its flags."""

    help: str
    stages: tuple[str, ...] | None
    flags: tuple[Flag, ...] = field(default_factory=tuple)


_LOCAL = Flag("--local", "run in this process without Ray (one worker)", "local")
_RESTART = Flag("--restart", "train the run again from scratch (ignore checkpoints and a finished "
                "adapter)", "restart")
_DEPLOY = Flag("--deploy", "deploy or update the Serve app at the end", "deploy")

VERBS: dict[str, Verb] = {
    "prior": Verb("generate the class-prior images into the shared cache (Ray Data)", ("prior",),
                  (_LOCAL,)),
    "encode": Verb("priors and the encoded latent cache (Ray Data)", ("prior", "encode")),
    "train": Verb("train a subject's DreamBooth-LoRA adapter and register it",
                  ("prior", "encode", "train", "register"), (_LOCAL, _RESTART)),
    "tune": Verb("search prior_loss_weight x learning_rate with Ray Tune; register the best",
                 ("prior", "encode", "tune", "register")),
    "pipeline": Verb("priors -> encode -> train or tune -> register [-> serve], skipping stages "
                     "whose inputs are unchanged", None, (_DEPLOY, _RESTART)),
}


def _run_verb(name: str, cfg: RaydbConfig, args: argparse.Namespace) -> dict[str, Any]:
    from raydb.pipeline import cluster_is_joined, run_pipeline

    verb = VERBS[name]
    options = {flag.dest: getattr(args, flag.dest) for flag in verb.flags}
    stages = list(verb.stages) if verb.stages else None
    if getattr(args, "stages", None):
        stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    if stages and "serve" in stages:
        options["deploy"] = True
    joined = cluster_is_joined(cfg)  # asked before Ray starts: a local start sets RAY_ADDRESS
    if not options.get("local"):
        from raydb.cluster import init_ray

        init_ray(cfg)
    result = run_pipeline(cfg, stages=stages, **options)
    if options.get("deploy") and not joined:  # our own local cluster ends with us: keep serving
        print(json.dumps(result, default=str))
        from raydb.serving import run_server

        run_server(cfg, blocking=True)
        return {}
    return result


def _cmd_serve(cfg: RaydbConfig, args: argparse.Namespace) -> dict:
    from raydb.serving import run_server

    run_server(cfg, blocking=True)
    return {}


def _cmd_demo(cfg: RaydbConfig, args: argparse.Namespace) -> dict:
    from raydb.demo import run_demo

    keep = args.keep_serving == "yes" or (args.keep_serving == "auto" and sys.stdin.isatty())
    return run_demo(cfg, output=args.output, keep_serving=keep)


def _cmd_export(cfg: RaydbConfig, args: argparse.Namespace) -> dict:
    """Export a registered adapter (latest or ``--version``) to another format, beside the
    diffusers file in the registry (``--output``: a copy there too)."""
    from raydb.export import export_version
    from raydb.storage import Storage

    return export_version(Storage(cfg.s3_endpoint_url), cfg, args.subject, args.version, fmt=args.format,
                          output=args.output)


def _cmd_batch(cfg: RaydbConfig, args: argparse.Namespace) -> dict:
    """Train every subject of a manifest (raydb.batch); exit 1 when any subject failed."""
    from raydb.batch import load_manifest, run_batch
    from raydb.config import ConfigError

    try:
        subjects = load_manifest(args.manifest, cfg)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    if not args.local:
        from raydb.cluster import init_ray

        init_ray(cfg)
    result = run_batch(subjects, local=args.local, max_concurrent=args.max_concurrent)
    if result["failed"]:
        print(json.dumps(result, default=str))
        failed = [r["subject_id"] for r in result["subjects"] if r["status"] == "failed"]
        raise BatchFailed(f"{len(failed)} of {len(subjects)} subject(s) failed: {', '.join(failed)}")
    return result


class BatchFailed(RuntimeError):
    """Some subjects of a batch failed (each one's error is in the summary above)."""


def _cmd_config(cfg: RaydbConfig, args: argparse.Namespace) -> dict:
    """Print the validated config with every default filled in."""
    import yaml

    if args.reference:
        from raydb.config import config_reference_markdown

        print(config_reference_markdown(), flush=True)
        return {}
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), flush=True)
    return {}


# The other verbs: (function, help, extra flags as argparse arguments).
OTHER: dict[str, tuple[Callable[[RaydbConfig, argparse.Namespace], dict], str, list[tuple]]] = {
    "serve": (_cmd_serve, "run the Ray Serve app over the adapter registry", []),
    "demo": (_cmd_demo, "the embedded end-to-end demo (tiny model, built-in subject)",
             [(("--output",), {"default": "demo-output", "help": "where the demo's pictures go"}),
              (("--keep-serving",), {"choices": ["auto", "yes", "no"], "default": "auto",
                                     "help": "keep the server (and its web console) up until Ctrl-C "
                                             "(auto: when run from a terminal)"})]),
    "export": (_cmd_export, "export a registered adapter for ComfyUI / AUTOMATIC1111 / kohya (kohya format)",
               [(("--version",), {"help": "registry version, e.g. v0003 (default: latest)"}),
                (("--format",), {"default": "kohya", "choices": ["kohya"], "help": "export format"}),
                (("--output",), {"help": "also write the file here (local path or s3:// URI)"})]),
    "batch": (_cmd_batch, "train every subject of a manifest (shared priors, concurrent trainings)",
              [(("--manifest",), {"required": True, "help": "YAML list of subjects (docs/service.md)"}),
               (("--local",), {"action": "store_true", "help": "one subject after another in this process, "
                                                            "without Ray"}),
               (("--max-concurrent",), {"type": int, "default": None,
                                        "help": "subjects training at once (default: all; Ray queues "
                                                "what the cluster cannot fit)"})]),
    "config": (_cmd_config, "validate a config and print it with defaults filled in",
               [(("--reference",), {"action": "store_true", "help": "print the key reference (Markdown)"})]),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raydb", description="Ray-native DreamBooth-LoRA: personalize and serve SD models.",
        epilog="Overrides: dotted key=value after the options, e.g. train.max_steps=60",
    )
    parser.add_argument("--version", action="version", version=f"raydb {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    specs: dict[str, tuple[str, list[tuple]]] = {}
    for name, verb in VERBS.items():
        flags = [((f.name,), {"action": "store_true", "help": f.help, "dest": f.dest}) for f in verb.flags]
        if verb.stages is None:
            flags.append((("--stages",), {"help": "comma-separated subset, e.g. prior,encode (default: "
                                                   "all; tune instead of train when the config has tune:)"}))
        specs[name] = (verb.help, flags)
    specs |= {name: (help_text, flags) for name, (_, help_text, flags) in OTHER.items()}
    for name, (help_text, flags) in specs.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "export":
            p.add_argument("subject", metavar="SUBJECT", help="the registered subject id to export")
        p.add_argument("--config", "-c", help="YAML config (default: built-in defaults)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        for names, kwargs in flags:
            p.add_argument(*names, **kwargs)
        add_console_flags(p)
    return parser


def _version() -> str:
    """The installed distribution's version (pyproject.toml's ``version``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("raydb")
    except PackageNotFoundError:  # a source tree on PYTHONPATH, never installed
        return "0+unknown"


def _failures() -> tuple[type[BaseException], ...]:
    """Errors that are the user's input or environment, reported as one line."""
    from raydb.serving.adapters import AdapterError
    from raydb.storage import StorageError
    from raydb.tune.stage import TuneFailed

    return (ValueError, FileNotFoundError, StorageError, AdapterError, TuneFailed, BatchFailed)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if any(e.startswith("-") for e in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides += extra  # positionals after an option (`raydb export SUBJECT --config x k=v`)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "export" and "=" in args.subject:
        parser.error("export: name the SUBJECT first, then key=value overrides")
    setup_console(args.log_level, verbose=args.verbose)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"raydb: {exc}", file=sys.stderr)
        return 2
    run = (lambda: _run_verb(args.command, cfg, args)) if args.command in VERBS else (
        lambda: OTHER[args.command][0](cfg, args))
    try:
        result = run()
        if result:
            print(json.dumps(result, default=str), flush=True)
    except _failures() as exc:  # bad input: a clear message, not a traceback
        print(f"raydb {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `raydb config --reference | head`: the reader left, which is no error
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell tool killed by the closed pipe reports
    return 0


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush of the closed pipe stays quiet."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
