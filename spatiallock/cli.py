"""Command line: `spatiallock <command> --help` explains each command.

Argument parsing only; each command calls a function of the package. Errors the user can fix
(`SpatialLockError`, and a mistyped or missing option) end as one line on stderr and exit code 2; warnings
are one line each.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from spatiallock.errors import SpatialLockError


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line naming the option and where the help is, instead of the
    whole usage block. The subcommands' parsers are made of this class too."""

    def error(self, message: str):
        print(f"spatiallock: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        self.exit(2)

    def parse_args(self, args=None, namespace=None):
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:  # said by the command's own parser, so that the hint names the command's help
            commands = next((a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)), {})
            commands.get(getattr(parsed, "command", None), self).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def _one_line_warnings(show=warnings.showwarning):
    """`warnings.showwarning` for the package's own warnings: one line each (others as Python shows them)."""
    package = str(Path(__file__).resolve().parent)

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        if not str(Path(filename).resolve()).startswith(package):
            return show(message, category, filename, lineno, file, line)
        print(f"spatiallock: warning: {message}", file=sys.stderr if file is None else file)

    return show_warning


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is an allocation failure (Python's, or torch's on CPU or GPU)."""
    text = str(err)
    return isinstance(err, MemoryError) or "out of memory" in text.lower() or "can't allocate memory" in text


def build_parser() -> argparse.ArgumentParser:
    from spatiallock.commands import app as app_cmd
    from spatiallock.commands import data as data_cmd
    from spatiallock.commands import demo as demo_cmd
    from spatiallock.commands import evaluate as evaluate_cmd
    from spatiallock.commands import generate as generate_cmd
    from spatiallock.commands import insert as insert_cmd
    from spatiallock.commands import locate as locate_cmd
    from spatiallock.commands import params as params_cmd
    from spatiallock.commands import train as train_cmd
    from spatiallock.threads import HELP as THREADS_HELP

    parser = ArgumentParser(
        prog="spatiallock",
        description="Layout-controlled text-to-image generation: a caption plus boxes with labels in, images out.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Run `spatiallock <command> --help` for the options of one command.\n\n{THREADS_HELP}",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    params_cmd.register(sub)
    data_cmd.register(sub)
    train_cmd.register(sub)
    generate_cmd.register(sub)
    evaluate_cmd.register(sub)
    locate_cmd.register(sub)
    insert_cmd.register(sub)
    demo_cmd.register(sub)
    app_cmd.register(sub)
    for command in sub.choices.values():  # every command's --help ends with how to set its threads
        if command.epilog is None:
            command.epilog = THREADS_HELP
    return parser


def main(argv: list[str] | None = None) -> int:
    from spatiallock.invocation import invoked

    with invoked(sys.argv[1:] if argv is None else argv):  # a training run records it
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    from spatiallock.threads import configure_threads

    configure_threads()  # before torch loads: thread settings that survive a busy machine
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:
        if done.code == 2:  # a usage error, its line printed: returned like every other refusal
            return 2
        raise  # --help
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            result = args.func(args)
    except SpatialLockError as err:
        print(f"spatiallock: error: {' '.join(str(err).splitlines())}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:  # an allocation that failed: one line, not torch's traceback
        if not is_out_of_memory(err):
            raise
        print(
            f"spatiallock: error: out of memory ({type(err).__name__}); ask for less at once: a smaller --size, "
            "--batch-size, --candidates or --n",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("spatiallock: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
