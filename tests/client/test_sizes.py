"""Human sizes: parsing K/M/G/T (binary) and formatting them back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockd.client.sizes import INT64_MAX, format_rate, format_size, parse_size

# (text, bytes) pairs; every text parses to its number.
PARSE = [
    ("0", 0), ("4096", 4096), ("1k", 1024), ("1K", 1024), ("512K", 512 * 1024),
    ("50M", 50 * 2**20), ("50m", 50 * 2**20), ("50MiB", 50 * 2**20), ("50MB", 50 * 2**20),
    ("1.5G", 3 * 2**29), ("2T", 2 * 2**40), (".5k", 512), ("10M/s", 10 * 2**20),
    (" 7 ", 7), ("1P", 2**50), ("7E", 7 * 2**60),
]  # fmt: skip
# (bytes, text) pairs for format_size.
FORMAT = [
    (0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536, "1.5 KiB"), (65536, "64 KiB"),
    (50 * 2**20, "50 MiB"), (3 * 2**29, "1.5 GiB"), (2**40, "1 TiB"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "value"), PARSE)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "-1", "1.2.3", "5Q", "1 0", "8E", "abc", "1e6"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize(("value", "text"), FORMAT)
def test_format_size(value: int, text: str) -> None:
    assert format_size(value) == text


def test_format_rate() -> None:
    assert format_rate(0) == "unlimited"
    assert format_rate(50 * 2**20) == "50 MiB/s"


@given(st.integers(min_value=0, max_value=2**40), st.sampled_from(["", "K", "M", "G"]))
def test_round_trip_exact_multiples(n: int, unit: str) -> None:
    factor = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[unit]
    if n * factor <= INT64_MAX:
        assert parse_size(f"{n}{unit}") == n * factor
        # A formatted exact multiple parses back to the same number of bytes.
        text = format_size(n * factor)
        if "." not in text:
            assert parse_size(text.replace(" ", "")) == n * factor
