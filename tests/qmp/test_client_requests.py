"""The requests real clients send (docs/clients.md §2.3, §3, §4) are valid for blockd's schema,
judged twice: by blockd's validator and by a port of the rules libvirt's test suite
applies to ``query-qmp-schema`` (``tests/testutilsqemuschema.c``, docs/clients.md §2.5). Both
judges must agree on every case, valid or not, so introspection and validation describe
the same contract."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockd.errors import RequestError
from blockd.qmp.schema import Schema

VALID: list[tuple[str, dict[str, Any]]] = [
    # libvirt (blockdev mode) block pull, with and without the 9.0 flag
    ("block-stream", {"device": "libvirt-3-format", "job-id": "pull-vda-libvirt-3-format",
                      "base-node": "libvirt-1-format", "backing-file": "base.qcow2",
                      "auto-finalize": True, "auto-dismiss": False,
                      "backing-mask-protocol": True}),
    ("block-stream", {"device": "libvirt-3-format", "job-id": "pull-vda-libvirt-3-format",
                      "speed": 1048576, "auto-finalize": True, "auto-dismiss": False}),
    ("block-job-cancel", {"device": "pull-vda-libvirt-3-format"}),
    ("block-job-cancel", {"device": "pull-vda-libvirt-3-format", "force": True}),
    ("block-job-set-speed", {"device": "pull-vda-libvirt-3-format", "speed": 0}),
    ("job-dismiss", {"id": "pull-vda-libvirt-3-format"}),
    ("job-finalize", {"id": "j"}),
    ("job-complete", {"id": "j"}),
    ("query-jobs", {}),
    ("query-block-jobs", {}),
    ("query-named-block-nodes", {}),
    ("query-named-block-nodes", {"flat": True}),
    ("blockdev-del", {"node-name": "libvirt-2-format"}),
    # Proxmox VolumeChain.pm
    ("block-stream", {"job-id": "stream-drive-scsi0", "device": "fmt-top",
                      "base-node": "fmt-parent", "backing-file": "parent.qcow2"}),
    # tp-qemu with backing-mask-protocol, on-error, bottom, filter
    ("block-stream", {"device": "top", "job-id": "j", "bottom": "mid", "on-error": "stop",
                      "filter-node-name": "stream-filter", "backing-mask-protocol": True}),
    # qemu.qmp negotiation, qmp-shell completion
    ("qmp_capabilities", {"enable": ["oob"]}),
    ("qmp_capabilities", {}),
    ("query-commands", {}),
    ("query-version", {}),
    ("query-qmp-schema", {}),
    ("quit", {}),
    # iotest 030 style blockdev-add
    ("blockdev-add", {"driver": "qcow2", "node-name": "ro-top", "read-only": True,
                      "file": {"driver": "file", "filename": "/img/ro-top.qcow2",
                               "read-only": True},
                      "backing": "mid"}),
    ("blockdev-add", {"driver": "raw", "node-name": "base",
                      "file": {"driver": "blkdebug", "image": {"driver": "file",
                                                               "filename": "/img/b.img"}}}),
    ("blockdev-add", {"driver": "copy-on-read", "node-name": "cor", "file": "top",
                      "bottom": "mid"}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "n", "file": "f", "backing": None}),
]  # fmt: skip

INVALID: list[tuple[str, dict[str, Any]]] = [
    ("block-stream", {}),
    ("block-stream", {"device": "d", "speed": "fast"}),
    ("block-stream", {"device": "d", "on-error": "explode"}),
    ("block-stream", {"device": "d", "bogus": 1}),
    ("block-job-cancel", {"device": "d", "force": "yes"}),
    ("job-dismiss", {}),
    ("qmp_capabilities", {"enable": ["nope"]}),
    ("query-jobs", {"x": 1}),
    ("blockdev-add", {"node-name": "n"}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "n"}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "n", "file": 1}),
    ("blockdev-add", {"driver": "qcow2", "node-name": "n", "file": "f", "nope": 1}),
    ("blockdev-add", {"driver": "raw", "file": {"driver": "file"}}),
]


class LibvirtJudge:
    """A port of the rules libvirt's tests apply to a QMP schema
    (docs/clients.md §2.5)."""

    def __init__(self, info: list[dict[str, Any]]) -> None:
        self.entities = {entity["name"]: entity for entity in info}

    def command(self, name: str, arguments: dict[str, Any]) -> bool:
        return self.value(self.entities[name]["arg-type"], arguments)

    def value(self, type_name: str, value: Any) -> bool:
        entity = self.entities[type_name]
        meta = entity["meta-type"]
        if meta == "builtin":
            return {
                "string": lambda v: isinstance(v, str),
                "int": lambda v: type(v) is int,
                "number": lambda v: type(v) in (int, float),
                "boolean": lambda v: isinstance(v, bool),
                "null": lambda v: v is None,
                "value": lambda v: True,
            }[entity["json-type"]](value)
        if meta == "enum":
            return isinstance(value, str) and value in entity["values"]
        if meta == "array":
            return isinstance(value, list) and all(
                self.value(entity["element-type"], item) for item in value
            )
        if meta == "alternate":
            return any(self.value(m["type"], value) for m in entity["members"])
        assert meta == "object"
        if not isinstance(value, dict):
            return False
        members = {m["name"]: m for m in entity["members"]}
        if "variants" in entity:
            tag = value.get(entity["tag"])
            variants = {v["case"]: v["type"] for v in entity["variants"]}
            if not isinstance(tag, str) or tag not in variants:
                return False
            members |= {m["name"]: m for m in self.entities[variants[tag]]["members"]}
        for name, member in members.items():
            if name not in value:
                if "default" not in member:
                    return False
            elif not self.value(member["type"], value[name]):
                return False
        return set(value) <= set(members)


@pytest.fixture(scope="module")
def schema() -> Schema:
    return Schema.load()


@pytest.fixture(scope="module")
def judge(schema: Schema) -> LibvirtJudge:
    return LibvirtJudge(schema.introspect())


def validator_accepts(schema: Schema, command: str, arguments: dict[str, Any]) -> bool:
    try:
        schema.validate_arguments(command, arguments)
    except RequestError:
        return False
    return True


@pytest.mark.parametrize(("command", "arguments"), VALID)
def test_client_requests_are_valid(
    schema: Schema, judge: LibvirtJudge, command: str, arguments: dict[str, Any]
) -> None:
    assert validator_accepts(schema, command, arguments)
    assert judge.command(command, arguments)


@pytest.mark.parametrize(("command", "arguments"), INVALID)
def test_both_judges_refuse(
    schema: Schema, judge: LibvirtJudge, command: str, arguments: dict[str, Any]
) -> None:
    assert not validator_accepts(schema, command, arguments)
    assert not judge.command(command, arguments)


KEYS = [
    "device", "job-id", "base-node", "speed", "on-error", "auto-dismiss", "driver",
    "node-name", "file", "backing", "filename", "read-only", "image", "bottom", "zz",
]  # fmt: skip
SCALARS = st.sampled_from(
    [None, True, 0, -1, 2**40, 1.5, "", "x", "stop", "file", "qcow2", "raw", "blkdebug"]
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4)
    ),
    max_leaves=8,
)


@given(
    st.sampled_from(["block-stream", "blockdev-add", "job-dismiss", "block-job-cancel"]),
    st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6),
)
def test_judges_agree_on_random_arguments(
    schema: Schema, judge: LibvirtJudge, command: str, arguments: dict[str, Any]
) -> None:
    assert validator_accepts(schema, command, arguments) == judge.command(command, arguments)
