"""DICOM element values read defensively: DS/IS/CS values that may be multi-valued, text, bytes or garbage.

Real files carry "1.0\\2.0" where one number is expected, trailing NULs, and numbers stored as text; each helper
returns None for what is not a usable value instead of raising, and the decoder then records its default.
"""

from __future__ import annotations

import math
from typing import Any

def first_float(value: Any) -> float | None:
    """First number of a DS/IS value that may be multi-valued, a string, bytes or garbage."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        value = value.split("\\")[0].strip()
    elif not isinstance(value, (int, float)) and hasattr(value, "__len__"):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def floats(value: Any) -> list[float | None]:
    """Every number of a possibly multi-valued DS element (MultiValue, list, backslash-separated text)."""
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("ascii", "replace")
    if isinstance(value, str):
        return [first_float(part) for part in value.split("\\")]
    if isinstance(value, (int, float)):
        return [first_float(value)]
    try:
        return [first_float(item) for item in value]
    except TypeError:
        return [first_float(value)]


def as_int(value: Any) -> int | None:
    number = first_float(value)
    return int(number) if number is not None else None


def as_text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip().rstrip("\x00").strip()
    return text or None
