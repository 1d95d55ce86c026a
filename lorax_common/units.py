"""Sizes as users write them: `--max-size 110MB`, `--max-shard-size 1.2GiB` (decimal and binary units)."""

from __future__ import annotations

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'110MB', '1.2GiB', '123456' -> bytes (MB = 10^6, MiB = 2^20); ValueError naming the accepted units."""
    t = text.strip().lower().replace(" ", "")
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in UNITS or value < 0:
        raise ValueError(f"{text!r} is not a size: expected a number with B, KB, MB, GB, KiB, MiB or GiB")
    return int(value * UNITS[unit])
