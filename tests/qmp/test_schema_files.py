"""The real ``schema/`` directory: it loads under the README's rules, every file is a
draft 2020-12 schema, blockd's validator accepts exactly what jsonschema accepts for it, its
introspection is well formed, and the paths real clients probe resolve (docs/clients.md §1,
§2.2, §2.5)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kit.schema import Oracle, Values, metaschema_errors, probe, read_files

import blockd.qmp
from blockd.errors import RequestError
from blockd.qmp.schema import Schema, shipped

FILES = read_files(shipped())
VALUES = Values(FILES)


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema.load()


@pytest.fixture(scope="module")
def oracle() -> Oracle:
    return Oracle(FILES)


def test_every_file_is_a_draft_2020_12_schema() -> None:
    # The daemon does not check this (it imports no JSON Schema library): this test does.
    assert metaschema_errors(FILES) == []


# QEMU's texts for argument errors (docs/qemu-behaviour/qmp-protocol.md §6), and blockd's
# one of its own.
QEMU_TEXTS = re.compile(
    r"Parameter '[^']*' is (missing|unexpected)"
    r"|Invalid parameter type for '[^']*', expected: \w+"
    r"|Parameter '[^']*' does not accept value '.*'"
    r"|Parameter '[^']*' expects u?int(8|16|32|64)(_t)?"
    r"|Parameters are nested too deeply",
    re.DOTALL,
)


def judge(schema: Schema, command: str, arguments: dict[str, Any]) -> bool:
    """Whether blockd accepts ``arguments``; an error must be one of QEMU's texts."""
    try:
        schema.validate_arguments(command, arguments)
    except RequestError as exc:
        assert QEMU_TEXTS.fullmatch(exc.desc), exc.desc
        return False
    return True


@pytest.mark.parametrize("command", sorted(set(FILES["commands"]) - {"blockdev-add"}))
@settings(max_examples=40)
@given(data=st.data())
def test_accepts_what_jsonschema_accepts(
    schema: Schema, oracle: Oracle, command: str, data: st.DataObject
) -> None:
    """Valid and broken arguments alike: blockd and jsonschema agree on every one."""
    arguments = data.draw(VALUES.arguments(command))
    assert judge(schema, command, arguments) == oracle.accepts("commands", command, arguments)


@settings(max_examples=400)
@given(arguments=VALUES.arguments("blockdev-add"))
def test_blockdev_add_accepts_what_jsonschema_accepts(
    schema: Schema, oracle: Oracle, arguments: dict[str, Any]
) -> None:
    """Nested union variants and alternates of ``blockdev-add``, valid and broken."""
    assert judge(schema, "blockdev-add", arguments) == oracle.accepts(
        "commands", "blockdev-add", arguments
    )


@pytest.mark.parametrize("event", sorted(FILES["events"]))
@settings(max_examples=30)
@given(data=st.data())
def test_event_data_as_jsonschema(
    schema: Schema, oracle: Oracle, event: str, data: st.DataObject
) -> None:
    value = data.draw(VALUES.event_data(event))
    try:
        schema.validate_event(event, value)
        ours = True
    except ValueError:
        ours = False
    assert ours == oracle.accepts("events", event, value)


def test_the_values_are_valid_broken_and_nested(oracle: Oracle) -> None:
    """The strategy behind the tests above makes both kinds, and nests inline options."""
    seen: Counter[str] = Counter()

    @settings(max_examples=300, database=None)
    @given(arguments=VALUES.arguments("blockdev-add"))
    def draw(arguments: dict[str, Any]) -> None:
        seen["valid" if oracle.accepts("commands", "blockdev-add", arguments) else "broken"] += 1
        inner = [arguments.get(key) for key in ("file", "backing", "data-file", "image")]
        if any(isinstance(value, dict) and isinstance(value.get("file"), dict) for value in inner):
            seen["nested twice"] += 1

    draw()
    assert seen["valid"] > 60 and seen["broken"] > 60 and seen["nested twice"] > 10, seen


def test_the_daemon_imports_no_json_schema_library() -> None:
    code = (
        "import blockd.run, blockd.server, blockd.commands.registry\n"
        "from blockd.qmp.schema import Schema\n"
        "schema = Schema.load()\n"
        "schema.validate_arguments('blockdev-add', {'driver': 'file', 'filename': 'f'})\n"
        "schema.introspect()\n"
        "import sys\n"
        "loaded = {'jsonschema', 'referencing', 'rpds'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.fixture(scope="module")
def info(schema: Schema) -> list[dict[str, Any]]:
    return schema.introspect()


def test_core_commands_exist(schema: Schema) -> None:
    assert {
        "qmp_capabilities",
        "query-version",
        "query-commands",
        "query-qmp-schema",
        "quit",
    } <= schema.commands


def test_introspection_hygiene(schema: Schema, info: list[dict[str, Any]]) -> None:
    names = [entity["name"] for entity in info]
    assert len(names) == len(set(names))
    entities = {entity["name"]: entity for entity in info}

    def exists(name: str) -> None:
        assert name in entities, f"{name} is referenced but not defined"

    for entity in info:
        meta = entity["meta-type"]
        assert meta in {"builtin", "enum", "array", "object", "alternate", "command", "event"}
        assert entity.get("features", ["x"]), "features only when non-empty"
        if meta in ("object", "enum", "alternate"):
            assert entity["name"].isdigit(), "type names are masked"
        if meta == "command":
            exists(entity["arg-type"])
            exists(entity["ret-type"])
            assert entity.get("allow-oob", True) is True
        elif meta == "event":
            exists(entity["arg-type"])
        elif meta == "array":
            exists(entity["element-type"])
            assert entity["name"] == f"[{entity['element-type']}]"
        elif meta == "object":
            for member in entity["members"]:
                exists(member["type"])
                assert member.get("default", None) is None
            for variant in entity.get("variants", []):
                exists(variant["type"])
        elif meta == "alternate":
            for member in entity["members"]:
                exists(member["type"])
        elif meta == "enum":
            assert [m["name"] for m in entity["members"]] == entity["values"]
    assert {e["name"] for e in info if e["meta-type"] == "command"} == schema.commands
    assert {e["name"] for e in info if e["meta-type"] == "event"} == schema.events


def test_block_stream_members_as_qemu_10(info: list[dict[str, Any]]) -> None:
    entities = {entity["name"]: entity for entity in info}
    args = entities[entities["block-stream"]["arg-type"]]
    members = [(m["name"], m["type"], "default" in m) for m in args["members"]]
    # QEMU 10.0's order (docs/clients.md §2.5, libvirt's caps_10.0.0 capture)
    assert [name for name, _, _ in members] == [
        "job-id",
        "device",
        "base",
        "base-node",
        "backing-file",
        "backing-mask-protocol",
        "bottom",
        "speed",
        "on-error",
        "filter-node-name",
        "auto-finalize",
        "auto-dismiss",
    ]
    assert ("device", "str", False) in members
    assert ("backing-mask-protocol", "bool", True) in members
    assert ("speed", "int", True) in members


# The paths libvirt and others probe (docs/clients.md §2.5).
PROBES = [
    "block-stream/arg-type/backing-mask-protocol",
    "block-stream/arg-type/*backing-mask-protocol",
    "block-stream/arg-type/*base-node",
    "block-stream/arg-type/*backing-file",
    "block-stream/arg-type/*job-id",
    "block-stream/arg-type/on-error/^stop",
    "query-jobs/ret-type/error",
    "query-jobs/ret-type/current-progress",
    "query-block-jobs/ret-type/io-status",
    "JOB_STATUS_CHANGE/arg-type/status/^pending",
    "JOB_STATUS_CHANGE/arg-type/status/^concluded",
    "blockdev-add/arg-type/+qcow2/backing",
    "blockdev-add/arg-type/+file/filename",
    "qmp_capabilities/arg-type/*enable",
    "query-version/ret-type/qemu/major",
    "query-version/ret-type/package",
]


@pytest.mark.parametrize("path", PROBES)
def test_client_probes(info: list[dict[str, Any]], path: str) -> None:
    assert probe(info, path), f"{path} does not resolve"


def test_probe_negative(info: list[dict[str, Any]]) -> None:
    assert not probe(info, "block-stream/arg-type/*device")
    assert not probe(info, "block-stream/arg-type/no-such-member")
    assert not probe(info, "no-such-command/arg-type")


def test_own_answers_conform(schema: Schema, info: list[dict[str, Any]]) -> None:
    from blockd.qmp.messages import version_info

    schema.validate_return("query-version", version_info())
    schema.validate_return("query-qmp-schema", info)
    schema.validate_return("query-commands", [{"name": n} for n in sorted(schema.commands)])
    schema.validate_return("quit", {})
    schema.validate_arguments("qmp_capabilities", {"enable": ["oob"]})


# blockd.qmp is pure: no I/O layer, no block layer, and no JSON Schema library at run time.
NOT_IN_THE_CORE = ("blockd.server", "blockd.daemon", "blockd.block", "blockd.jobs",
                   "blockd.commands", "jsonschema", "referencing")  # fmt: skip


def test_no_trio_in_the_protocol_core() -> None:
    package = Path(blockd.qmp.__file__).parent
    for path in package.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] != "trio", f"{path.name} imports {name}"
                assert not name.startswith(NOT_IN_THE_CORE), f"{path.name} imports {name}"


_KEYS = ["device", "job-id", "id", "speed", "driver", "node-name", "file", "filename",
         "backing", "image", "enable", "flat", "force", "x"]  # fmt: skip
_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["", "x", "file", "qcow2", "raw", "blkdebug", "report", "oob"]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=4)
    ),
    max_leaves=12,
)


@given(data=st.data())
def test_any_request_gets_an_answer(schema: Schema, data: st.DataObject) -> None:
    """Whatever the arguments, the core answers with a Request or an error, never raises."""
    from blockd.qmp.connection import NEED_DATA, Connection, Output, Request
    from blockd.qmp.messages import encode, version_info

    command = data.draw(st.sampled_from(sorted(schema.commands)))
    arguments = data.draw(st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=6))
    conn = Connection(schema, version=version_info())
    conn.receive_data(b'{"execute": "qmp_capabilities"}')
    assert isinstance(conn.next_event(), Output)
    conn.receive_data(encode({"execute": command, "arguments": arguments, "id": arguments}))
    event = conn.next_event()
    assert isinstance(event, Request | Output)
    assert conn.next_event() is NEED_DATA
