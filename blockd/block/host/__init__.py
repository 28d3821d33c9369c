"""The host side of the ``file`` driver and of offloaded copies.

* :mod:`~blockd.block.host.io` -- host calls Python's ``os`` lacks (``sync_file_range``,
  hole punching), through the C library, with fallbacks;
* :mod:`~blockd.block.host.writebehind` -- starts writeback of written ranges early;
* :mod:`~blockd.block.host.locking` -- QEMU's permission bits as OFD byte-range locks;
* :mod:`~blockd.block.host.offload` -- copies between host files that never pass through
  Python (``copy_file_range``), and when a chain allows them.
"""
