"""JSON from a stranger, parsed within bounds: what the envelope and safetensors headers go through.

Usage::

    header = parse_json(raw_bytes, Limits())     # GraphError / LimitExceeded, never anything else

Bounds hold before or while parsing, not after: the number of containers is counted on the
raw bytes before the parser builds anything; integers longer than 20 digits are refused as the
parser meets them (Python's own int parsing is quadratic in the digits); NaN/Infinity are
refused; a repeated key in one object is refused (two readers could keep different ones); and
every string must be re-encodable UTF-8 of bounded length, so whatever is stored can be sent
back out (a lone UTF-16 surrogate could not).
"""

from __future__ import annotations

import json
import re
from typing import Any

from .validate import GraphError, LimitExceeded, Limits

_MAX_INT_DIGITS = 20  # the largest int64 has 19 digits, and a sign
_LONG_DIGITS = re.compile(rb"[0-9]{%d}" % (_MAX_INT_DIGITS + 1))


class _Refused(ValueError):
    pass


def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > _MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(text)} digits is too long")
    return int(text)


def _parse_constant(text: str) -> Any:
    raise _Refused(f"{text} is not allowed in JSON here")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found = dict(pairs)
    if len(found) != len(pairs):
        keys = [k for k, _ in pairs]
        repeated = next(k for k in keys if keys.count(k) > 1)
        raise _Refused(f"the key {repeated[:40]!r} appears twice in one object")
    return found


def parse_json(data: bytes, limits: Limits, what: str = "header") -> Any:
    """Parse `data` as JSON within `limits`; raise GraphError (LimitExceeded for sizes)."""
    containers = data.count(b"{") + data.count(b"[")
    if containers > limits.max_json_containers:
        raise LimitExceeded(
            f"{what} has up to {containers} objects and lists, over the limit of {limits.max_json_containers}"
        )
    # Integers of over 20 digits are refused as the parser meets them; where the text has no run
    # of 21 digits at all, none can be there, and the parser reads integers natively (faster).
    long_digits = _LONG_DIGITS.search(data) is not None
    try:
        value = json.loads(
            data,
            parse_int=_parse_int if long_digits else None,
            parse_constant=_parse_constant,
            object_pairs_hook=_no_duplicates,
        )
    except _Refused as exc:
        raise GraphError(f"{what} is not acceptable JSON: {exc}") from None
    except RecursionError:
        raise GraphError(f"{what} is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise GraphError(f"{what} is not valid JSON: {str(exc)[:200]}") from None
    # A string longer than the limit needs text longer than the limit, and a lone surrogate can
    # only come from a \u escape: without either, every string is known to pass.
    if len(data) > limits.max_string_chars or b"\\u" in data:
        _check_strings(value, limits, what)
    return value


def _check_strings(value: Any, limits: Limits, what: str) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _check_string(item, limits, what)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, inner in item.items():
                _check_string(key, limits, what)
                stack.append(inner)


def _check_string(text: str, limits: Limits, what: str) -> None:
    if len(text) > limits.max_string_chars:
        raise LimitExceeded(f"{what} holds a string of {len(text)} characters, over the limit of {limits.max_string_chars}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise GraphError(f"{what} holds a string that is not valid Unicode (a lone surrogate)") from None
