"""blockd as users install it: the package under test is the installed one, it ships every
module and the whole ``schema/``, and its commands work from any directory.

CI installs the wheel (not editable) and sets ``BLOCKD_TEST_INSTALLED=1``; then these tests
also fail if ``blockd`` is imported from the checkout or from an editable install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from kit.repo import ROOT

import blockd
from blockd.qmp.schema import shipped

STRICT = os.environ.get("BLOCKD_TEST_INSTALLED") == "1"


def _editable() -> bool:
    direct_url = metadata.distribution("blockd").read_text("direct_url.json")
    return bool(direct_url and json.loads(direct_url).get("dir_info", {}).get("editable"))


def _expected_init() -> Path:
    """Where ``blockd/__init__.py`` must come from, by the installed distribution."""
    if _editable():
        return ROOT / "blockd" / "__init__.py"
    dist = metadata.distribution("blockd")
    return Path(str(dist.locate_file("blockd/__init__.py"))).resolve()


def test_installed_not_editable_in_ci() -> None:
    if not STRICT:
        pytest.skip("BLOCKD_TEST_INSTALLED is not set: any install is fine")
    assert not _editable(), "CI must test the installed wheel, not an editable install"
    assert ROOT not in Path(blockd.__file__).resolve().parents


def test_imported_from_the_installed_location() -> None:
    assert Path(blockd.__file__).resolve() == _expected_init()


def test_child_pythons_import_the_installed_package() -> None:
    # The daemons the suite starts run ``python -m blockd`` from the checkout's top.
    found = subprocess.run(
        [sys.executable, "-c", "import blockd; print(blockd.__file__)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert Path(found).resolve() == _expected_init()


def test_shipped_schema_is_the_repository_schema() -> None:
    source = ROOT / "schema"
    expected = {
        str(path.relative_to(source)): path.read_bytes()
        for path in source.rglob("*")
        if path.suffix in (".json", ".md")
    }
    installed = shipped()
    found = {}
    for kind in ("commands", "events", "types"):
        for entry in (installed / kind).iterdir():
            if entry.name.endswith(".json"):
                found[f"{kind}/{entry.name}"] = entry.read_bytes()
    found["README.md"] = (installed / "README.md").read_bytes()
    assert found == expected


def test_every_module_is_packaged() -> None:
    declared = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        ".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "blockd").rglob("*.py")
    }
    assert on_disk <= declared, f"add to pyproject.toml packages: {sorted(on_disk - declared)}"
    if not _editable():
        shipped_files = {str(f) for f in metadata.files("blockd") or ()}
        modules = {str(p.relative_to(ROOT)) for p in (ROOT / "blockd").rglob("*.py")}
        assert modules <= shipped_files, sorted(modules - shipped_files)


@pytest.mark.parametrize(
    "argv",
    [
        ["blockd", "--version"],
        ["blockctl", "--help"],
        [sys.executable, "-m", "blockd", "--version"],
    ],
    ids=["blockd", "blockctl", "python-m-blockd"],
)
def test_commands_work_from_any_directory(tmp_path: Path, argv: list[str]) -> None:
    if argv[0] in ("blockd", "blockctl"):
        script = Path(sys.executable).parent / argv[0]
        if not script.exists():
            pytest.skip(f"{argv[0]} is not installed beside {sys.executable}")
        argv = [str(script), *argv[1:]]
    result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
