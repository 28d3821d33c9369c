"""The QMP protocol core, sans-IO: nothing in this package imports trio or does I/O.

* :mod:`blockd.qmp.framing` -- the input byte stream to JSON values, with QEMU's lexer,
  limits and error texts;
* :mod:`blockd.qmp.messages` -- QEMU's output encoding and the shapes of replies;
* :mod:`blockd.qmp.connection` -- one monitor session (negotiation, envelope checks,
  validation), driven by :mod:`blockd.server`;
* :mod:`blockd.qmp.schema` and :mod:`blockd.qmp.introspect` -- ``schema/``: loading,
  argument validation with QEMU's texts, ``query-qmp-schema``;
* QEMU's QDict and GHashTable orders, which pick the error reported, are
  :mod:`blockd.qdict` (the block layer's ``json:`` filenames use them too).
"""
