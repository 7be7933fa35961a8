"""The ``coembed`` command. Each subcommand parses its arguments and calls the library.

A user's mistake ends with one line on stderr and exit code 2 (usage) or 1 (failure); a
traceback is only ever shown for a bug in coembed itself. Ctrl-C ends with exit code 130 and
SIGTERM with 143 (128 + the signal), both after the same clean-up: SIGTERM is raised in the
main thread as ``Terminated``, a KeyboardInterrupt, so every ``finally`` that removes a
temporary or releases a lock runs for it too. Nothing here imports torch: each handler imports
the library when it runs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

from coembed import __version__
from coembed.cli import curate, data, demo, evaluate, index, interop, serve, train
from coembed.cli.common import Parser
from coembed.errors import CoembedError
from coembed.names import escape_name
from coembed.process import choose_openmp_waiting

# In the order `coembed --help` lists them.
COMMAND_MODULES = (demo, train, evaluate, index, serve, interop, curate, data)


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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so that it unwinds as Ctrl-C does."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises Terminated in the main thread (elsewhere: unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Run ``coembed`` with ``argv`` (default: the process's); returns the exit code."""
    with sigterm_as_interrupt():
        return run_command(build_parser(), argv)


def run_command(parser: Parser, argv: list[str] | None) -> int:
    """Parse ``argv`` and run its command; a user's error becomes one line and an exit code."""
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
        # Escaped: a file name in the message may hold a newline, which would make two lines.
        sys.stderr.write(f"coembed: error: {escape_name(exc)}\n")
        return exc.exit_code
    except OSError as exc:
        # A path that cannot be read or written (missing, permissions, disk full): the user's to fix.
        sys.stderr.write(f"coembed: error: {escape_name(exc)}\n")
        return 1
    except Terminated:
        sys.stderr.write("coembed: terminated\n")
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        sys.stderr.write("coembed: interrupted\n")
        return 130
