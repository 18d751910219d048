"""``genserve train FAMILY ...`` and ``genserve demo``.

Each family is a sub-command with exactly its own options, read from the registry, so
``genserve train kde --help`` lists the kernels and ``--kernel`` given to ``gmm`` is an error
rather than silently ignored.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training import registry


def _argparse_type(parse):
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def _contamination(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a rate in (0, 1), got {text}")
    return value


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="fit a model and publish it to a model repository")
    families = train.add_subparsers(dest="family", required=True, metavar="FAMILY")
    for family in registry.FAMILIES.values():
        parser = families.add_parser(family.name, help=family.summary, description=family.summary)
        parser.add_argument("--data", required=True,
                            help="digits, grid25, digits-bold, regimes, a path to a .npy/.csv file of rows, "
                                 "or (cyclegan) a folder of PNG images with A/ and B/ subfolders")
        parser.add_argument("--out", required=True, type=Path, help="model repository folder")
        parser.add_argument("--name", help="model name (default: DATASET-FAMILY)")
        parser.add_argument("--contamination", type=_contamination, default=0.01,
                            help="share of held-out normal rows the anomaly threshold flags (default 0.01)")
        parser.add_argument("--calibration-folds", type=int, default=5,
                            help="folds of the cross-fitted threshold calibration (default 5)")
        for option in family.options:
            bare = dict(nargs="?", const=True) if option.parse is registry.switch else {}  # --flag = --flag yes
            parser.add_argument(option.flag, dest=option.param, type=_argparse_type(option.parse),
                                choices=option.choices, help=option.help, default=None, **bare)
        parser.set_defaults(func=run_train, option_params=[o.param for o in family.options])

    demo = subparsers.add_parser("demo", help="build the demo model repository if absent, then serve it")
    demo.add_argument("--repo", type=Path, default=Path("model-repo"))
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8500)
    demo.add_argument("--metrics-port", type=int, default=9100)
    demo.add_argument("--build-only", action="store_true", help="build the repository and exit")
    demo.set_defaults(func=run_demo)


def run_train(args: argparse.Namespace) -> int:
    from training.pipeline import train_and_publish

    params = {p: getattr(args, p) for p in args.option_params}
    data = Path(args.data)
    dataset_label = data.stem if args.data.endswith((".npy", ".csv")) else data.name if data.is_dir() else args.data
    name = args.name or f"{dataset_label}-{args.family}".lower()
    try:
        train_and_publish(args.family, args.data, args.out, name, params,
                          contamination=args.contamination, calibration_folds=args.calibration_folds)
    except ValueError as error:
        print(f"genserve train: error: {error}", file=sys.stderr)
        return 2
    return 0


def run_demo(args: argparse.Namespace) -> int:
    from training.demo import build_demo_repository

    build_demo_repository(args.repo)
    if args.build_only:
        return 0
    from serving.config import Settings
    from serving.server import serve_forever

    serve_forever(Settings(repo=args.repo, host=args.host, port=args.port, metrics_port=args.metrics_port))
    return 0
