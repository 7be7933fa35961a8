"""What every command shares: the parser that reports usage errors, shared options, JSON output."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass

from coembed.errors import UsageError
from coembed.names import check_path


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit code 2, and refuses a value
    with a NUL byte (no path or name can hold one) in any option, once, where they enter."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see --help)")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """The parsed arguments, each string checked by ``coembed.names.check_path``."""
        parsed = super().parse_args(args, namespace)
        names = option_names(self, parsed)
        for dest, value in vars(parsed).items():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, str):
                    check_path(item, names.get(dest, dest))
        return parsed


def option_names(parser: argparse.ArgumentParser, parsed: argparse.Namespace) -> dict[str, str]:
    """How the command line spells each parsed argument (``--output``, ``query``), through the
    subcommand chosen."""
    names: dict[str, str] = {}
    for action in parser._actions:
        spelled = action.option_strings[-1] if action.option_strings else action.dest
        names.setdefault(action.dest, spelled)
        if isinstance(action.choices, dict):  # the subcommands
            chosen = action.choices.get(getattr(parsed, action.dest, None))
            if isinstance(chosen, argparse.ArgumentParser):
                names.update(option_names(chosen, parsed))
    return names


@dataclass(frozen=True)
class Command:
    """One subcommand: its name and help, the function adding its arguments, and its handler."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str = ""


def add_device(parser: argparse.ArgumentParser) -> None:
    """Add ``--device`` (cpu, cuda or auto)."""
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")


def add_keys(parser: argparse.ArgumentParser) -> None:
    """Add ``--image-key`` and ``--caption-key``, the dataset columns to read."""
    parser.add_argument("--image-key", default=None, help="image column/key (default: filepath)")
    parser.add_argument("--caption-key", default=None, help="caption column/key (default: caption)")


def add_set(parser: argparse.ArgumentParser) -> None:
    """Add the repeatable ``--set KEY=VALUE`` config override."""
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value"
    )


def add_json(parser: argparse.ArgumentParser) -> None:
    """Add ``--json``: print one JSON object instead of text."""
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def print_json(obj: object) -> None:
    """Write ``obj`` to stdout as one line of JSON with sorted keys."""
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
