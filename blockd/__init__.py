"""blockd: a QMP-compatible block-job daemon.

The public surface is the QMP protocol described by the files in ``schema/``; the Python
modules are the implementation.
"""

from typing import Final

__version__: Final = "0.1.0"

#: The QEMU release whose QMP and block-job behaviour blockd follows. It is what the
#: greeting and ``query-version`` report, so clients gate features (for example
#: ``backing-mask-protocol``, QEMU 9.0) exactly as they would for that release.
QEMU_VERSION: Final = (10, 0, 0)
