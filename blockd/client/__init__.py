"""A small QMP client (trio) and the pieces ``blockctl`` is built from.

- :mod:`blockd.client.wire`: framing and message classes, no I/O.
- :mod:`blockd.client.connection`: :func:`connect` → :class:`Client` (execute, listen),
  on trio; :mod:`blockd.client.blocking`: :func:`connect_blocking` for one-shot commands,
  without an event loop; :mod:`blockd.client.errors`: what both raise.
- :mod:`blockd.client.follow`: follow a job to its end (events + polling).
- :mod:`blockd.client.sizes`, :mod:`blockd.client.views`: human sizes, tables and trees.
- :mod:`blockd.client.ctl`: the ``blockctl`` command; :mod:`blockd.client.watch` its
  subcommands that follow a job; :mod:`blockd.client.output` where results go.
- :mod:`blockd.client.lab`: chains and daemons for examples and tests (``make_chain``,
  ``running_daemon``).

It speaks QMP over the socket only, so it drives blockd or any qemu-storage-daemon.
Import the modules themselves: this package imports nothing, so that a short command
pays only for what it uses.
"""
