"""The ``coembed`` command. Each subcommand parses its arguments and calls the library.

A user's mistake ends with one line on stderr and exit code 2 (usage) or 1 (failure); a
traceback is only ever shown for a bug in coembed itself. Nothing here imports torch: each
handler imports the library when it runs.
"""

from __future__ import annotations

import os
import sys

from coembed import __version__
from coembed.cli import data, demo, evaluate, index, interop, serve, train
from coembed.cli.common import Parser
from coembed.errors import CoembedError
from coembed.process import choose_openmp_waiting

# In the order `coembed --help` lists them.
COMMAND_MODULES = (demo, train, evaluate, index, serve, interop, data)


def build_parser() -> Parser:
    """The ``coembed`` parser with every subcommand."""
    parser = Parser(
        prog="coembed",
        description="CLIP-style image-text embeddings: train, evaluate, index, search and serve.",
    )
    parser.add_argument("--version", action="version", version=f"coembed {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for module in COMMAND_MODULES:
        for command in module.COMMANDS:
            p = sub.add_parser(
                command.name, help=command.help, description=command.description or command.help
            )
            p.set_defaults(func=command.run)
            command.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``coembed`` with ``argv`` (default: the process's); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        # libgomp reads its waiting policy when torch loads it, and every subcommand imports
        # torch lazily, after this (parsing does not).
        choose_openmp_waiting(args.command)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return args.func(args)
    except BrokenPipeError:
        # `coembed search ... | head` closes stdout early; that is not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except CoembedError as exc:
        sys.stderr.write(f"coembed: error: {exc}\n")
        return exc.exit_code
    except OSError as exc:
        # A path that cannot be read or written (missing, permissions, disk full): the user's to fix.
        sys.stderr.write(f"coembed: error: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("coembed: interrupted\n")
        return 130
