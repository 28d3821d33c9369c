"""The README keeps its promises: every command and event of ``schema/`` is listed, and
the set-up commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"### {title}\n")
    end = README.find("\n#", start + 1)
    return README[start:end]


def test_every_command_is_listed() -> None:
    listed = set(re.findall(r"`([a-z_-]+)`", _section("Commands")))
    names = {path.stem for path in (ROOT / "schema" / "commands").glob("*.json")}
    assert not names - listed, f"add README lines for: {sorted(names - listed)}"


def test_every_event_is_listed() -> None:
    listed = set(re.findall(r"`([A-Z_]+)`", _section("Events")))
    names = {path.stem for path in (ROOT / "schema" / "events").glob("*.json")}
    assert not names - listed, f"add README lines for: {sorted(names - listed)}"


def test_ci_runs_the_readme_test_command() -> None:
    assert "pip install -e . && blockd demo" in README
    test_command = "pip install -e '.[test]' && python -m pytest -q"
    assert test_command in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q -e '.[test]'" in ci and "python -m pytest -q" in ci
