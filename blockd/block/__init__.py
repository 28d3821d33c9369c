"""The block layer: nodes, their drivers and the graph that links them.

The core, at this level:

* :mod:`~blockd.block.driver` -- the one driver interface (capabilities and about ten
  async methods, each with its contract) and the request value types;
* :mod:`~blockd.block.node` -- a node: bounds, read-only and alignment checks done once
  for every driver, then the driver call;
* :mod:`~blockd.block.graph` -- the only module that opens, links, reparents and closes
  nodes; :mod:`~blockd.block.permissions` computes what each node's users may do;
* :mod:`~blockd.block.chain` -- walks along backing chains (allocation, base lookup);
* :mod:`~blockd.block.dirty` -- dirty bitmaps: which granules of a node were written;
* :mod:`~blockd.block.request_lock` -- serialising overlapping requests on a node.

Its families, one folder each:

* :mod:`blockd.block.drivers` -- ``file``, ``raw``, ``blkdebug``, ``copy-on-read``, the
  filters commit jobs insert (``commit_top``, ``mirror_top``), and the
  table that maps QMP driver names to classes;
* :mod:`blockd.block.qcow2` -- the qcow2 format: on-disk math, refcounts, caches,
  snapshots, reads, writes, creation;
* :mod:`blockd.block.host` -- the host side of files: positional I/O in threads,
  write-behind, OFD locks, copy offload;
* :mod:`blockd.block.names` -- image names: backing file names from headers and the
  filenames (``json:``) QEMU gives nodes.

Nothing here imports jobs, commands or the server (``tests/test_layering.py``).
"""
