"""The repository's own folders, for the tests that read them or load what is not installed.

Paths: :data:`ROOT` (the top of the checkout) and the folders the tests read
(:data:`SCHEMA`, :data:`EXAMPLES`, :data:`SOURCE`). Packages: ``benchmarks`` and ``stress``
live at the top of the repository and are not installed; :func:`load_package` makes them
importable. The top of the repository never goes *first* on ``sys.path``: its ``blockd/``
would shadow the installed package the suite tests (``tests/conftest.py``, rule 9).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[2]
#: the QMP contract (``schema/``), as checked out
SCHEMA: Final = ROOT / "schema"
#: the example scripts and files (``examples/``)
EXAMPLES: Final = ROOT / "examples"
#: the package's source as checked out (``blockd/``), read as text; never imported
SOURCE: Final = ROOT / "blockd"


def load_package(name: str) -> None:
    """Make the top-level folder ``name`` (``benchmarks``, ``stress``) importable as the
    package ``name``.

    The repository's top is appended to ``sys.path`` *last*, after ``site-packages``:
    ``blockd`` still comes from the installed package (``tests/test_installed.py``), while
    the processes ``multiprocessing`` starts (a fork server's children take this
    ``sys.path``, not this process's modules) find the package by name too.

    Raises:
        ImportError: the folder is not a package, or another package of that name comes
            first on ``sys.path``.
    """
    if str(ROOT) not in sys.path:
        sys.path.append(str(ROOT))
    module = importlib.import_module(name)
    if Path(module.__file__ or "").resolve().parent != ROOT / name:
        raise ImportError(f"{name} comes from {module.__file__}, not from {ROOT / name}")
