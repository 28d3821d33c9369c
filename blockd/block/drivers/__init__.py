"""Block drivers, one module each; ``DRIVERS`` maps QMP driver names to classes.

A new driver registers itself with one additive line below (import and table entry).
"""

from __future__ import annotations

from typing import Final

from blockd.block.driver import Driver
from blockd.block.drivers.blkdebug import BlkdebugDriver
from blockd.block.drivers.copy_on_read import CopyOnReadDriver
from blockd.block.drivers.file import FileDriver
from blockd.block.drivers.raw import RawDriver
from blockd.block.qcow2.driver import Qcow2Driver

DRIVERS: Final[dict[str, type[Driver]]] = {
    "file": FileDriver,
    "raw": RawDriver,
    "qcow2": Qcow2Driver,
    "blkdebug": BlkdebugDriver,
    "copy-on-read": CopyOnReadDriver,
}
