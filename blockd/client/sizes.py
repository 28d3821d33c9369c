"""Human sizes in and out, binary units (1K = 1024 bytes), as qemu-img counts them."""

from __future__ import annotations

import re
from typing import Final

UNITS: Final = ("", "K", "M", "G", "T", "P", "E")
_SIZE_RE: Final = re.compile(
    r"^\s*(?P<num>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[kmgtpe]?)(?:i?b)?\s*(?:/s)?\s*$",
    re.IGNORECASE,
)
#: The largest value QMP's ``int`` accepts (``speed`` may go up to INT64_MAX).
INT64_MAX: Final = 2**63 - 1


def parse_size(text: str) -> int:
    """Parse ``"50M"``, ``"1.5G"``, ``"4096"``, ``"64KiB"``, ``"10M/s"`` into bytes.

    A bare number is bytes; ``K/M/G/T/P/E`` (either case, optionally followed by ``B`` or
    ``iB``) are powers of 1024. Fractions are rounded down to whole bytes.

    Raises:
        ValueError: not a size, or larger than INT64_MAX; the message says why.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(
            f"invalid size {text!r}: expected a number with an optional K/M/G/T suffix"
        )
    num: str = match["num"]
    power = UNITS.index(match["unit"].upper())
    unit = 1 << (10 * power)
    whole, _, frac = num.partition(".")
    frac = frac or "0"
    divisor: int = 10 ** len(frac)
    scaled = int(whole or "0") * unit + int(frac) * unit // divisor
    if scaled > INT64_MAX:
        raise ValueError(f"invalid size {text!r}: larger than {INT64_MAX} bytes")
    return scaled


def format_size(n: int | float) -> str:
    """``1536`` → ``"1.5 KiB"``; exact multiples drop the fraction (``"64 KiB"``)."""
    value = float(n)
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value < 1024:
        return f"{sign}{int(value)} B"
    for unit in UNITS[1:]:
        value /= 1024
        if value < 1024 or unit == UNITS[-1]:
            break
    text = f"{value:.0f}" if value == int(value) else f"{value:.1f}"
    return f"{sign}{text} {unit}iB"


def format_rate(bytes_per_second: int | float) -> str:
    """A speed for display; 0 means no limit (QMP's convention for ``speed``)."""
    if bytes_per_second <= 0:
        return "unlimited"
    return f"{format_size(bytes_per_second)}/s"
