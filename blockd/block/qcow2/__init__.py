"""The qcow2 format, one concern per module.

* :mod:`~blockd.block.qcow2.format` -- pure on-disk math: header, extensions, L1/L2 and
  refcount entries, validation (no I/O);
* :mod:`~blockd.block.qcow2.refcount` -- refcount blocks and cluster allocation;
* :mod:`~blockd.block.qcow2.cache` -- the L2 table cache (4 KiB slices, write-back);
* :mod:`~blockd.block.qcow2.snapshots` -- the internal snapshot table (read-only);
* :mod:`~blockd.block.qcow2.read` -- reads and block status;
* :mod:`~blockd.block.qcow2.driver` -- the ``qcow2`` driver: open, writes, offloaded
  copies, metadata write-back, header rewrites;
* :mod:`~blockd.block.qcow2.create` -- new images without ``qemu-img`` (the demo, tests).
"""
