"""The JSON files coembed reads back are checked against their expected shape, not trusted.

A model's config.json and preprocess.json, a run's run_config.json, a checkpoint's state.json,
an index's index.json and items file, COCO and Karpathy caption files: any of them may be cut
short, edited by hand or come from somewhere else. ``read_json`` reads one with a clear error
for every way the text can be wrong; ``check_shape`` then compares the value with a schema
written as plain data, so each file's expected shape is one readable literal beside its reader:

    str, bool, int, float    that type (true is not an integer; a number is finite, ints count)
    None                     null
    dict, list, object       any object, any list, anything
    (A, B)                   an A or a B
    [A]                      a list of A's, any length
    [A, B]                   a list of exactly two: an A, then a B
    {"key": A, "opt?": B}    an object with "key" (and with "opt" when it is there); more keys
                             are allowed, so a newer writer's extra fields do not break a reader
    Range(int, 0)            an integer >= 0 (``Range(kind, lo, hi)``, bounds included)

A mismatch raises the caller's error class, naming the file, the place in it and what was
expected: ``index.json: files.faiss: expected a string, got 5``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from coembed.errors import CoembedError

_NAMES = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    float: "a number",
    dict: "an object",
    list: "a list",
    object: "anything",
}


@dataclass(frozen=True)
class Range:
    """An int (or a finite number) between ``lo`` and ``hi``, both included; None is open."""

    kind: type
    lo: float | None = None
    hi: float | None = None


def describe(schema: Any) -> str:
    """What ``schema`` asks for, in words ("a list of strings", "an integer >= 0", ...)."""
    if schema is None:
        return "null"
    if isinstance(schema, tuple):
        return " or ".join(describe(s) for s in schema)
    if isinstance(schema, list):
        if len(schema) == 1:
            return f"a list of {_plural(describe(schema[0]))}"
        return f"a list of {len(schema)} ({', '.join(describe(s) for s in schema)})"
    if isinstance(schema, dict):
        keys = ", ".join(repr(k) for k in schema if not k.endswith("?"))
        return f"an object with {keys}" if keys else "an object"
    if isinstance(schema, Range):
        bounds = [f">= {schema.lo:g}" if schema.lo is not None else ""]
        bounds.append(f"<= {schema.hi:g}" if schema.hi is not None else "")
        return " ".join([_NAMES[schema.kind], *filter(None, bounds)])
    return _NAMES[schema]


def _plural(description: str) -> str:
    """ "a string" -> "strings", "a string or null" -> "strings or nulls"."""
    if " or " in description:
        return " or ".join(_plural(part) for part in description.split(" or "))
    if not description.startswith(("a ", "an ")):
        return f"{description}s"  # "null", "true or false"
    noun, _, rest = description.split(" ", 1)[1].partition(" ")
    return f"{noun}s {rest}".strip()


def _is(value: Any, kind: type) -> bool:
    if kind is str:  # the most common, first
        return isinstance(value, str)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return isinstance(value, int) or math.isfinite(value)  # an int of any size is finite
    return kind is object or isinstance(value, kind)


def _shown(value: Any) -> str:
    """A value as an error message shows it: JSON words for scalars, a size for containers."""
    if isinstance(value, list):
        return f"a list of {len(value)} item{'s' if len(value) != 1 else ''}"
    if isinstance(value, dict):
        return f"an object with {len(value)} key{'s' if len(value) != 1 else ''}"
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    text = json.dumps(value) if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _same_container(value: Any, schema: Any) -> bool:
    return (isinstance(schema, list) and isinstance(value, list)) or (
        isinstance(schema, dict) and isinstance(value, dict)
    )


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def fits(value: Any, schema: Any) -> bool:
    """Whether ``value`` fits ``schema`` (the fast check; ``mismatch`` says where it does not)."""
    return _checker(schema)(value)


# Compiled checkers, by schema (schemas are module constants): an items file or a COCO file
# holds a million entries, and a closure per schema node checks them ten times faster than
# walking the schema for each.
_CHECKERS: dict[int, tuple[Any, Callable[[Any], bool]]] = {}


def _checker(schema: Any) -> Callable[[Any], bool]:
    cached = _CHECKERS.get(id(schema))
    if cached is not None and cached[0] is schema:
        return cached[1]
    check = _compile(schema)
    _CHECKERS[id(schema)] = (schema, check)  # the schema kept alive, so its id stays its own
    return check


def _compile(schema: Any) -> Callable[[Any], bool]:
    simple = schema if isinstance(schema, tuple) else (schema,)
    if all(s is None or s in (str, bool, int, dict, list, object) for s in simple):
        return _simple_check(simple)
    if isinstance(schema, type):
        return partial(_is, kind=schema)
    if isinstance(schema, tuple):
        alternatives = [_checker(s) for s in schema]
        return lambda v: any(check(v) for check in alternatives)
    if isinstance(schema, list):
        if len(schema) > 1:
            positions = [_checker(s) for s in schema]
            return lambda v: (
                isinstance(v, list)
                and len(v) == len(positions)
                and all(check(x) for check, x in zip(positions, v))
            )
        each = _checker(schema[0])
        return lambda v: isinstance(v, list) and all(map(each, v))
    if isinstance(schema, dict):
        required = [(k, _checker(s)) for k, s in schema.items() if not k.endswith("?")]
        optional = [(k[:-1], _checker(s)) for k, s in schema.items() if k.endswith("?")]
        return partial(_fits_object, required=required, optional=optional)
    return partial(_fits_range, bounds=schema)


def _simple_check(schemas: tuple) -> Callable[[Any], bool]:
    """One isinstance for types and null: ``(int, str)``, ``(str, None)``..."""
    if object in schemas:
        return lambda v: True
    kinds = tuple(s for s in schemas if s is not None) + ((type(None),) if None in schemas else ())
    if int in kinds and bool not in kinds:  # true and false are ints to Python, not to JSON
        return lambda v: isinstance(v, kinds) and v is not True and v is not False
    return lambda v: isinstance(v, kinds)


def _fits_object(value: Any, required: list, optional: list) -> bool:
    if not isinstance(value, dict):
        return False
    for key, check in required:
        if key not in value or not check(value[key]):
            return False
    return all(check(value[key]) for key, check in optional if key in value)


def _fits_range(value: Any, bounds: Range) -> bool:
    if not (_is(value, bounds.kind) and _is(value, float)):
        return False
    return (bounds.lo is None or value >= bounds.lo) and (bounds.hi is None or value <= bounds.hi)


def mismatch(value: Any, schema: Any, path: str = "") -> str | None:
    """Where and how ``value`` differs from ``schema`` ("files.faiss: expected a string, got
    5"), or None when it fits."""
    if fits(value, schema):
        return None
    wrong = f"{path + ': ' if path else ''}expected {describe(schema)}, got {_shown(value)}"
    if isinstance(schema, tuple):
        # One alternative of the value's own kind (a list for a list): say what is wrong inside.
        alike = [s for s in schema if _same_container(value, s)]
        return mismatch(value, alike[0], path) if len(alike) == 1 else wrong
    if isinstance(schema, list) and isinstance(value, list):
        if len(schema) > 1 and len(value) != len(schema):
            return wrong
        subs = schema * len(value) if len(schema) == 1 else schema
        return next(
            (
                mismatch(v, s, _join(path, i))
                for i, (v, s) in enumerate(zip(value, subs))
                if not fits(v, s)
            ),
            wrong,
        )
    if isinstance(schema, dict) and isinstance(value, dict):
        for key, sub in schema.items():
            name = key.rstrip("?")
            if name not in value:
                if not key.endswith("?"):
                    return f"{_join(path, name)}: missing"
            elif not fits(value[name], sub):
                return mismatch(value[name], sub, _join(path, name))
    return wrong


def check_shape(
    value: Any, schema: Any, where: str, error: type[CoembedError], advice: str = ""
) -> Any:
    """``value``, after checking it fits ``schema``; else ``error("WHERE: PLACE: expected ...,
    got ...; ADVICE")``."""
    found = mismatch(value, schema)
    if found:
        raise error(f"{where}: {found}{'; ' + advice if advice else ''}")
    return value


def read_json(path: str | os.PathLike, error: type[CoembedError], advice: str = "") -> Any:
    """The value in a JSON file, or one ``error`` saying why there is none: the file is
    missing, unreadable, not UTF-8, not JSON (cut short or corrupt) or nested too deeply."""
    return read_json_text(path, error, advice)[0]


def read_json_text(
    path: str | os.PathLike, error: type[CoembedError], advice: str = ""
) -> tuple[Any, str]:
    """``read_json``'s value and the file's text (for a digest of exactly what was read)."""
    path = Path(path)
    tail = f"; {advice}" if advice else ""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: missing{tail}") from None
    except OSError as exc:
        raise error(f"{path}: unreadable ({exc.strerror or exc}){tail}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}; corrupt){tail}") from None
    try:
        return json.loads(text), text
    except json.JSONDecodeError as exc:
        raise error(
            f"{path}: not valid JSON (truncated or corrupt: line {exc.lineno}, {exc.msg}){tail}"
        ) from None
    except (RecursionError, ValueError):  # nested thousands deep, or an integer of 5000 digits
        raise error(
            f"{path}: not valid JSON (nested too deeply or a number too long){tail}"
        ) from None
