"""The README keeps its promises: every command and event of ``schema/`` is listed, and
the set-up commands are the ones CI runs."""

from __future__ import annotations

import re

from kit.repo import ROOT

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


def test_ci_runs_the_readme_commands() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for command in ("pip install . && blockd demo", "pip install '.[test]' && pytest -q"):
        assert f"```sh\n{command}\n```" in README
        assert any(line.startswith(command) for line in ci), f".ci/run must run {command!r}"
