"""Damage done to a model or adapter folder's files, the same way in every test that shows it is refused.

Invariant: each function changes only the one file it is given, in place.
"""

from __future__ import annotations

from pathlib import Path


def flip_bit(path: Path, offset_from_end: int = 64) -> None:
    """Flip the lowest bit of the byte `offset_from_end` bytes before the end of `path`: in a safetensors
    file, a weight's lowest mantissa bit (still a finite float, so only a digest can tell)."""
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x01
    path.write_bytes(bytes(data))


def truncate_half(path: Path) -> None:
    """Cut `path` to the first half of its bytes (an interrupted copy)."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
