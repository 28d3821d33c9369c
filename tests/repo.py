"""The repository's own folders that are not installed: its top, and the ``benchmarks`` and
``stress`` packages the tests share with the long runs.

Imported as ``repo`` (``tests/`` is on ``sys.path``). The top of the repository is never put
on ``sys.path``: its ``blockd/`` would shadow the installed package the suite tests
(``tests/conftest.py``, rule 9). The two packages are loaded from their folders instead.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent


def load_package(name: str) -> None:
    """Make the top-level folder ``name`` importable as the package ``name``.

    Raises:
        ImportError: the folder has no ``__init__.py``.
    """
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        name, ROOT / name / "__init__.py", submodule_search_locations=[str(ROOT / name)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"{ROOT / name} is not a package")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
