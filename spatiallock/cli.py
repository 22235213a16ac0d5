"""Command line: `spatiallock <command> --help` explains each command.

Argument parsing only; each command calls a function of the package. Errors the user can fix
(`SpatialLockError`) end as one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from spatiallock.errors import SpatialLockError


def build_parser() -> argparse.ArgumentParser:
    from spatiallock.commands import demo as demo_cmd
    from spatiallock.commands import evaluate as evaluate_cmd
    from spatiallock.commands import generate as generate_cmd
    from spatiallock.commands import params as params_cmd
    from spatiallock.commands import train as train_cmd
    from spatiallock.data import commands as data_cmd

    parser = argparse.ArgumentParser(
        prog="spatiallock",
        description="Layout-controlled text-to-image generation: a caption plus boxes with labels in, images out.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `spatiallock <command> --help` for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    params_cmd.register(sub)
    data_cmd.register(sub)
    train_cmd.register(sub)
    generate_cmd.register(sub)
    evaluate_cmd.register(sub)
    demo_cmd.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except SpatialLockError as err:
        print(f"spatiallock: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("spatiallock: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
