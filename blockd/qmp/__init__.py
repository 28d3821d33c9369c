"""The QMP protocol core, sans-IO: framing, messages, sessions and the schema.

Nothing in this package imports trio; :mod:`blockd.server` drives it.
"""
