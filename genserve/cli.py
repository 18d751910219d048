"""The ``genserve`` command: ``train`` and ``demo`` (training side), ``serve`` and ``client``.

Each side registers its own sub-commands and is imported only here, so the serving image, which
has no torch, still runs ``genserve serve`` and ``genserve client``.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genserve", description="Train density and generative models, publish them to a model "
        "repository, serve them over gRPC, and call them.")
    parser.add_argument("--version", action="version", version=f"genserve {__import__('genserve').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from serving import cli as serving_cli

    serving_cli.register(sub)
    try:
        from training import cli as training_cli
    except ImportError as missing:  # a serving-only install: no torch
        for name in ("train", "demo"):
            stub = sub.add_parser(name, help=f"(needs the training extra: {missing.name} is missing)")
            stub.set_defaults(func=lambda _args, m=missing: _needs_training(m))
    else:
        training_cli.register(sub)
    return parser


def _needs_training(missing: ImportError) -> int:
    print(f"genserve: this install has no training support ({missing}); "
          "install it with: pip install 'genserve[training]'", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
