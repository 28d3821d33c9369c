"""Block drivers, one module each; ``DRIVERS`` maps QMP driver names to classes.

A new driver registers itself with one additive line below (import and table entry).
``JOB_FILTERS`` holds the filters that only jobs insert.
"""

from __future__ import annotations

from typing import Final

from blockd.block.driver import Driver
from blockd.block.drivers.blkdebug import BlkdebugDriver
from blockd.block.drivers.copy_on_read import CopyOnReadDriver
from blockd.block.drivers.file import FileDriver
from blockd.block.drivers.job_filters import CommitTopDriver, MirrorTopDriver
from blockd.block.drivers.raw import RawDriver
from blockd.block.qcow2.driver import Qcow2Driver

DRIVERS: Final[dict[str, type[Driver]]] = {
    "file": FileDriver,
    "raw": RawDriver,
    "qcow2": Qcow2Driver,
    "blkdebug": BlkdebugDriver,
    "copy-on-read": CopyOnReadDriver,
}

#: Filters only jobs insert (``Graph.insert_filter``): no ``blockdev-add``, no image
#: header and no ``json:`` name can open one.
JOB_FILTERS: Final[dict[str, type[Driver]]] = {
    "commit_top": CommitTopDriver,
    "mirror_top": MirrorTopDriver,
}
