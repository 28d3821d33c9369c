"""The iteration orders of QEMU's containers, where they decide what QEMU prints.

Pure and shared: the QMP core uses them to pick the error QEMU reports, the block layer to
order ``json:`` filenames as QEMU prints its options QDict.

Two places in QEMU pick "the first" of several offending keys by walking a hash table:

* the envelope checks walk the request's **QDict** (``qobject/qdict.c``): 512 buckets
  chosen by ``tdb_hash``, buckets in ascending order, the key inserted last first inside a
  bucket (docs/qemu-behaviour/qmp-protocol.md §1, §5);
* the unknown-argument check of the QAPI input visitor walks a **GHashTable** of the keys
  not yet visited (``qapi/qobject-input-visitor.c``, ``qobject_input_check_struct``): GLib's
  open-addressing table with ``g_str_hash``, quadratic probing and in-place resizing. The
  keys are inserted in QDict order and removed as the visitor consumes them.

Both are simulated here exactly, so blockd names the same key as QEMU (checked against
qemu-storage-daemon 10 by ``tests/qmp/test_qemu_differential.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

__all__ = ["first_leftover", "qdict_order"]

_MASK32: Final = 0xFFFFFFFF


def _c_bytes(key: str) -> bytes:
    # keys are modified UTF-8 C strings: U+0000 is C0 80
    return key.encode("utf-8", "surrogatepass").replace(b"\0", b"\xc0\x80")


def _tdb_hash(key: str) -> int:
    # reference: tdb_hash() in qobject/qdict.c
    raw = _c_bytes(key)
    value = (0x238F13AF * len(raw)) & _MASK32
    for i, byte in enumerate(raw):
        value = (value + (byte << (i * 5 % 24))) & _MASK32
    return (1103515243 * value + 12345) & _MASK32


def qdict_order(keys: Iterable[str]) -> list[str]:
    """``keys`` (in insertion order) in QEMU's QDict iteration order."""
    indexed = [(_tdb_hash(key) % 512, -i, key) for i, key in enumerate(keys)]
    indexed.sort()
    return [key for _, _, key in indexed]


def _g_str_hash(key: str) -> int:
    # reference: g_str_hash() in GLib (djb2 over *signed* chars)
    value = 5381
    for byte in _c_bytes(key):
        value = (value * 33 + (byte - 256 if byte >= 0x80 else byte)) & _MASK32
    return value


# reference: prime_mod[] in GLib's ghash.c
_PRIME_MOD: Final = (
    1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521,
    131071, 262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213, 33554393,
    67108859, 134217689, 268435399, 536870909, 1073741789, 2147483647,
)  # fmt: skip
_UNUSED: Final = 0
_TOMBSTONE: Final = 1


class _GHashTable:
    """Enough of GLib's GHashTable (2.74) to know its iteration order."""

    def __init__(self) -> None:
        self._set_shift(3)
        self.hashes = [_UNUSED] * self.size
        self.keys: list[str | None] = [None] * self.size
        self.nnodes = 0
        self.noccupied = 0

    def _set_shift(self, shift: int) -> None:
        self.size = 1 << shift
        self.mod = _PRIME_MOD[shift]
        self.mask = self.size - 1

    def _index(self, hash_value: int) -> int:
        return ((hash_value * 11) & _MASK32) % self.mod

    def _lookup(self, key: str) -> tuple[int, int, bool]:
        hash_value = max(_g_str_hash(key), 2)
        index = self._index(hash_value)
        step = 0
        tombstone = -1
        while self.hashes[index] != _UNUSED:
            if self.hashes[index] == hash_value and self.keys[index] == key:
                return index, hash_value, True
            if self.hashes[index] == _TOMBSTONE and tombstone < 0:
                tombstone = index
            step += 1
            index = (index + step) & self.mask
        return (tombstone if tombstone >= 0 else index), hash_value, False

    def insert(self, key: str) -> None:
        index, hash_value, found = self._lookup(key)
        if found:
            return
        old = self.hashes[index]
        self.hashes[index] = hash_value
        self.keys[index] = key
        self.nnodes += 1
        if old == _UNUSED:
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: str) -> None:
        index, _, found = self._lookup(key)
        if not found:
            return
        self.hashes[index] = _TOMBSTONE
        self.keys[index] = None
        self.nnodes -= 1
        self._maybe_resize()

    def _maybe_resize(self) -> None:
        size, occupied = self.size, self.noccupied
        if (size > self.nnodes * 4 and size > 8) or size <= occupied + occupied // 16:
            self._resize()

    def _resize(self) -> None:
        # reference: g_hash_table_resize() and resize_map(): rehashing in place
        old_size = self.size
        self._set_shift(max(int(self.nnodes * 1.333).bit_length(), 3))
        if self.size > old_size:
            self.hashes += [_UNUSED] * (self.size - old_size)
            self.keys += [None] * (self.size - old_size)
        moved = [False] * max(self.size, old_size)
        for i in range(old_size):
            node_hash = self.hashes[i]
            if node_hash < 2:
                self.hashes[i] = _UNUSED
                continue
            if moved[i]:
                continue
            self.hashes[i] = _UNUSED
            key, self.keys[i] = self.keys[i], None
            while True:
                index = self._index(node_hash)
                step = 0
                while moved[index]:
                    step += 1
                    index = (index + step) & self.mask
                moved[index] = True
                replaced = self.hashes[index]
                self.hashes[index] = node_hash
                if replaced < 2:
                    self.keys[index] = key
                    break
                node_hash = replaced
                key, self.keys[index] = self.keys[index], key
        del self.hashes[self.size :]
        del self.keys[self.size :]
        self.noccupied = self.nnodes

    def first(self) -> str | None:
        for hash_value, key in zip(self.hashes, self.keys, strict=True):
            if hash_value >= 2:
                return key
        return None


def first_leftover(keys: Sequence[str], visited: Iterable[str]) -> str | None:
    """The unknown key QEMU's input visitor reports for an object.

    Args:
        keys: the object's keys in input order.
        visited: the declared members present in it, in the order they were visited.

    Returns:
        The first key left in the visitor's GHashTable, or None if none is left.
    """
    table = _GHashTable()
    for key in qdict_order(keys):
        table.insert(key)
    for key in visited:
        table.remove(key)
    return table.first()
