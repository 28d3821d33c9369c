"""Names of images and nodes, as QEMU forms and reads them.

* :mod:`~blockd.block.names.backing` -- backing file names found in image headers:
  resolving relative names, ``json:`` and protocol names (opt-in), legacy prefixes;
* :mod:`~blockd.block.names.filename` -- the filename QEMU reports for a node: a path,
  ``blkdebug:...`` or ``json:{...}``.
"""
