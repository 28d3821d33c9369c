"""QMP command handlers, one module per area; see :mod:`blockd.commands.registry`."""
