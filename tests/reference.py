"""Where the reference QEMU binaries are, for the tests that compare blockd with them.

QEMU 10.0's ``qemu-storage-daemon`` and ``qemu-io`` are unpacked (not installed) by the
project's ``.ci/fetch-qemu10`` under ``$BLOCKD_QEMU10_ROOT`` (default ``/work/qsd10/root``);
Debian's packaged ``qemu-storage-daemon`` (7.2, ``qemu-system-common``) is the fallback
where a test accepts any release. A test that compares blockd with QEMU's exact replies,
events or image headers needs 10.0 (7.2 lacks ``backing-mask-protocol``, the ``active``
member of ``query-named-block-nodes`` and some of the error texts). Tests that need a
binary skip when it is missing, so the suite passes on a machine without them, and on
one with only Debian's 7.2.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

QEMU10_ROOT = Path(os.environ.get("BLOCKD_QEMU10_ROOT", "/work/qsd10/root"))
QEMU10_BIN = QEMU10_ROOT / "usr" / "bin"
QEMU10_LIB = QEMU10_ROOT / "usr" / "lib" / "x86_64-linux-gnu"
QSD10 = QEMU10_BIN / "qemu-storage-daemon"
QEMU10_IO = QEMU10_BIN / "qemu-io"

#: QEMU 10.0's daemon when unpacked, else one on PATH, else None: for tests that accept
#: any release.
QSD: str | None = str(QSD10) if QSD10.exists() else shutil.which("qemu-storage-daemon")
#: QEMU 10.0's daemon when unpacked, else None: for tests of 10.0's exact behaviour.
QSD_10: str | None = str(QSD10) if QSD10.exists() else None
