"""Entry point of the ``tierflow`` command: registers the subcommands.

To add a command, write ``tierflow/cli/<name>.py`` with ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``, and add its name to
:data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: Subcommand modules under ``tierflow.cli``, in the order ``--help`` lists them.
COMMANDS = (
    "train",
    "plan",
    "generate",
    "bench",
)

#: Exit status for a tierflow error (bad input, budget, NVMe): a message, no traceback.
EXIT_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every command of :data:`COMMANDS` registered."""
    parser = argparse.ArgumentParser(
        prog="tierflow",
        description="Train models bigger than device and host memory by tiering parameters, "
        "gradients and optimizer state across device memory, host memory and NVMe files.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"tierflow.cli.{name}")
        sub = subparsers.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``tierflow`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    from tierflow.cli.messages import for_cli
    from tierflow.errors import TierflowError

    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "run", None) is None:
        parser.print_help()
        return EXIT_ERROR
    try:
        return int(args.run(args) or 0)
    except TierflowError as exc:
        print(f"tierflow: error: {for_cli(str(exc), vars(args))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt as exc:  # `tierflow train` says which checkpoint to resume from
        print(f"tierflow: {exc or 'interrupted'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
