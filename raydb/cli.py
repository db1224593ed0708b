"""``raydb`` command line: one subcommand per pipeline stage, each calling one raydb function.

Every subcommand takes ``--config FILE`` and then ``key=value`` overrides, e.g.::

    raydb train --config jobs/configs/demo.yaml train.max_steps=60
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

from raydb.config import ConfigError, RaydbConfig, load_config

__all__ = ["main"]


def _cmd_config(cfg: RaydbConfig, args: argparse.Namespace) -> dict:
    """Print the validated config with every default filled in."""
    import yaml

    if args.reference:
        from raydb.config import config_reference_markdown

        print(config_reference_markdown())
        return {}
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return {}


def _cmd_prior(cfg: RaydbConfig, args: argparse.Namespace) -> dict:
    from raydb.prior import ensure_prior_images

    if not args.no_ray:
        from raydb.ray_utils import init_ray

        init_ray(cfg)
    return ensure_prior_images(cfg, use_ray=not args.no_ray).to_dict() | {"stage": "prior"}


def _cmd_train(cfg: RaydbConfig, args: argparse.Namespace) -> dict:
    if args.local:
        from raydb.train.run import train_subject

        return train_subject(cfg, resume=not args.restart)
    from raydb.ray_utils import init_ray
    from raydb.train.distributed import train_distributed

    init_ray(cfg)
    return train_distributed(cfg)


def _cmd_serve(cfg: RaydbConfig, args: argparse.Namespace) -> dict:
    from raydb.serving import run_server

    run_server(cfg, blocking=True)
    return {}


def _cmd_pipeline(cfg: RaydbConfig, args: argparse.Namespace) -> dict:
    from raydb.pipeline import cluster_is_joined, run_pipeline

    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    deploy = args.deploy or bool(stages and "serve" in stages)
    joined = cluster_is_joined(cfg)  # asked before Ray starts: a local start sets RAY_ADDRESS
    result = run_pipeline(cfg, deploy=deploy, stages=stages)
    if deploy and not joined:  # our own local cluster ends with us: keep serving
        print(json.dumps(result, default=str))
        from raydb.serving import run_server

        run_server(cfg, blocking=True)
        return {}
    return result


def _cmd_tune(cfg: RaydbConfig, args: argparse.Namespace) -> dict:
    from raydb.tune import run_tune

    return run_tune(cfg)


def _cmd_encode(cfg: RaydbConfig, args: argparse.Namespace) -> dict:
    from raydb.pipeline import run_pipeline

    return run_pipeline(cfg, stages=["prior", "encode"])


def _cmd_demo(cfg: RaydbConfig, args: argparse.Namespace) -> dict:
    from raydb.demo import run_demo

    return run_demo(cfg, output=args.output)


COMMANDS: dict[str, tuple[Callable, str]] = {
    "prior": (_cmd_prior, "generate the class-prior images into the shared cache (Ray Data)"),
    "train": (_cmd_train, "train a subject's DreamBooth-LoRA adapter and register it"),
    "serve": (_cmd_serve, "run the Ray Serve app over the adapter registry"),
    "pipeline": (_cmd_pipeline, "priors -> encode -> train or tune -> register [-> serve], "
                 "skipping stages whose inputs are unchanged"),
    "tune": (_cmd_tune, "search prior_loss_weight x learning_rate with Ray Tune; register the best"),
    "encode": (_cmd_encode, "priors and the encoded latent cache (Ray Data)"),
    "demo": (_cmd_demo, "the embedded end-to-end demo (tiny model, built-in subject)"),
    "config": (_cmd_config, "validate a config and print it with defaults filled in"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raydb", description="Ray-native DreamBooth-LoRA: personalize and serve SD models.",
        epilog="Overrides: dotted key=value after the options, e.g. train.max_steps=60",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", help="YAML config (default: built-in defaults)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
        if name == "prior":
            p.add_argument("--no-ray", action="store_true", help="generate in this process")
        if name == "train":
            p.add_argument("--local", action="store_true",
                           help="train in this process without Ray (one worker)")
            p.add_argument("--restart", action="store_true",
                           help="with --local: ignore existing checkpoints")
        if name == "config":
            p.add_argument("--reference", action="store_true", help="print the key reference (Markdown)")
        if name == "pipeline":
            p.add_argument("--deploy", action="store_true",
                           help="deploy or update the Serve app at the end")
            p.add_argument("--stages", help="comma-separated subset, e.g. prior,encode "
                           "(default: all; tune instead of train when the config has tune:)")
        if name == "demo":
            p.add_argument("--output", default="demo-output", help="where the demo's pictures go")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"raydb: {exc}", file=sys.stderr)
        return 2
    try:
        result = COMMANDS[args.command][0](cfg, args)
    except (ValueError, FileNotFoundError) as exc:  # bad input: a clear message, not a traceback
        print(f"raydb {args.command}: error: {exc}", file=sys.stderr)
        return 1
    if result:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
