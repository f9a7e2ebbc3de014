"""Byte sizes as users write them ("2GiB", "512 MB", 1 << 30) and as people read them."""

from __future__ import annotations

import re

__all__ = ["format_bytes", "parse_bytes"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | str, *, name: str = "size") -> int:
    """Return a byte count from an int or a string such as ``"2GiB"``, ``"1.5 GB"`` or ``"4096"``.

    Decimal units (kB, MB, GB) are powers of 1000 and binary units (KiB, MiB, GiB) powers of 1024,
    as in the SI/IEC standards. Raises ValueError (naming ``name``) for anything else.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"{name} must be an int or a string such as '2GiB', not {value!r}")
    if isinstance(value, int):
        count = value
    else:
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"{name}: cannot read {value!r} as a byte size (e.g. '2GiB', '512MB')")
        count = int(float(match.group(1)) * _UNITS[unit])
    if count < 0:
        raise ValueError(f"{name} must not be negative, got {value!r}")
    return count


def format_bytes(count: int | float) -> str:
    """Return ``count`` bytes in binary units with three significant digits: ``"1.50 GiB"``."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.3g} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
