"""The qcow2 internal snapshot table, read only (docs/interop/qcow2.txt, "Snapshots").

blockd never creates, applies or deletes internal snapshots; it lists them in ImageInfo
(``snapshots``, as QEMU's ``query-named-block-nodes`` does) and refuses a table that
cannot be right at open, as QEMU does.

One table entry, all big-endian, padded to a multiple of 8 bytes::

    0   l1_table_offset (8)     8  l1_size (4)        12 id_str_size (2)
    14  name_size (2)          16  date_sec (4)       20 date_nsec (4)
    24  vm_clock_nsec (8)      32  vm_state_size (4)  36 extra_data_size (4)
    40  extra data: vm_state_size_large (8), disk_size (8), icount (8) -- as long
        as extra_data_size says; then the id string, then the name

Pure: the caller reads the bytes (:func:`table_bytes` says how many it needs).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

from blockd.errors import ImageError

#: QEMU's QCOW_MAX_SNAPSHOTS_SIZE: the whole table, bytes
MAX_TABLE_BYTES: Final = 64 * 1024 * 1024
#: QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA
MAX_EXTRA_DATA: Final = 1024
_FIXED: Final = struct.Struct(">QIHHIIQII")
_NO_ICOUNT: Final = (1 << 64) - 1


@dataclass(frozen=True)
class Snapshot:
    """One entry of the table (the members ImageInfo reports, and its L1 table)."""

    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    icount: int | None

    def info(self) -> dict[str, Any]:
        """The SnapshotInfo QAPI object QEMU reports for this entry."""
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "vm-state-size": self.vm_state_size,
            "date-sec": self.date_sec,
            "date-nsec": self.date_nsec,
            "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
            "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
        }
        if self.icount is not None:
            out["icount"] = self.icount
        return out


class ShortTable(Exception):
    """The buffer ends inside the table; ``needed`` bytes are needed at least."""

    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


def parse_table(data: bytes, count: int, *, cluster_size: int) -> list[Snapshot]:
    """The ``count`` entries of a table whose bytes start ``data``.

    Raises:
        ShortTable: ``data`` ends before the table does (read more and retry).
        ImageError: an entry QEMU refuses too (too much extra data, a table over
            64 MiB, an L1 table offset that is not cluster aligned).
    """
    out: list[Snapshot] = []
    pos = 0
    for i in range(count):
        if pos + _FIXED.size > len(data):
            raise ShortTable(pos + _FIXED.size)
        (l1_offset, l1_size, id_size, name_size, date_sec, date_nsec, vm_clock, vm_state,
         extra_size) = _FIXED.unpack_from(data, pos)  # fmt: skip
        if extra_size > MAX_EXTRA_DATA:
            raise ImageError(f"Too much extra metadata in snapshot table entry {i}")
        end = pos + _FIXED.size + extra_size + id_size + name_size
        end = (end + 7) & ~7
        if end > MAX_TABLE_BYTES:
            raise ImageError("Snapshot table is too big")
        if end > len(data):
            raise ShortTable(end)
        extra = data[pos + _FIXED.size : pos + _FIXED.size + extra_size]
        if len(extra) >= 8:
            vm_state = struct.unpack_from(">Q", extra, 0)[0]
        icount: int | None = None
        if len(extra) >= 24:
            raw_icount = struct.unpack_from(">Q", extra, 16)[0]
            icount = None if raw_icount == _NO_ICOUNT else raw_icount
        if l1_offset % cluster_size:
            raise ImageError(f"Snapshot L1 table offset invalid (entry {i})")
        text = pos + _FIXED.size + extra_size
        ident = data[text : text + id_size].decode("utf-8", "replace")
        name = data[text + id_size : text + id_size + name_size].decode("utf-8", "replace")
        out.append(
            Snapshot(
                ident, name, l1_offset, l1_size, date_sec, date_nsec, vm_clock, vm_state, icount
            )
        )
        pos = end
    return out
