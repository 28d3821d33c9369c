"""The QMP contract: one JSON Schema per command, event and type (see ``README.md`` here).

This folder is data, not code. The build ships it inside the package as ``blockd._schema``
(``pyproject.toml``), where :func:`blockd.qmp.schema.shipped` finds it through
``importlib.resources``; this file only makes it a regular package, so that an editable
install resolves it too.
"""
