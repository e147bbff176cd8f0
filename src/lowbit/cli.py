"""The `lowbit` command line: `lowbit <command> --help` for each command."""

from __future__ import annotations

import argparse
import importlib
import sys

from lowbit.commands import COMMAND_MODULES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit", description="Low-bit quantization for PyTorch models.",
        epilog="example: lowbit demo",
    )
    parser.add_argument("--verbose", action="store_true", help="full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"lowbit.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"lowbit.commands.{name}":
                continue  # command not built in this version
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line unless --verbose
        if args.verbose or getattr(args, "verbose_sub", False):
            raise
        print(f"lowbit {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
