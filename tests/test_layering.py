"""The import rules of blockd's packages, checked on the source.

Every ``import`` in ``blockd/`` counts, at module level or inside a function, except those
under ``if TYPE_CHECKING:`` (annotations only). Each rule names the modules it applies to,
the modules they must not import, and why. ``test_no_import_cycles`` allows no cycle.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest
from kit.repo import SOURCE

PACKAGE = SOURCE


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> set[str]:
    """The modules ``path`` imports at run time (absolute names)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            # "from blockd.block import graph" imports the submodule blockd.block.graph
            found.update(f"{module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
IMPORTS = {name: {m for m in _imports(path)} for name, path in MODULES.items()}
#: imports of blockd's own modules only (a "from x import name" of a non-module dropped)
EDGES = {name: {m for m in found if m in MODULES and m != name} for name, found in IMPORTS.items()}


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


@dataclass(frozen=True)
class Rule:
    """Modules under one of ``sources`` (minus ``except_``) import nothing under ``banned``."""

    name: str
    sources: tuple[str, ...]
    banned: tuple[str, ...]
    why: str
    except_: tuple[str, ...] = ()

    def applies(self, module: str) -> bool:
        return any(_within(module, s) for s in self.sources) and not any(
            _within(module, e) for e in self.except_
        )


PURE = ("blockd.qmp", "blockd.nbd", "blockd.qdict", "blockd.errors", "blockd.options")
PURE_JOBS = ("blockd.jobs.state", "blockd.jobs.policy", "blockd.jobs.ratelimit")
ENGINE = (
    *PURE_JOBS,
    "blockd.jobs.job",
    "blockd.jobs.manager",
    "blockd.jobs.setup",
    "blockd.jobs.holds",
    "blockd.jobs.window",
)
DAEMON = ("blockd.server", "blockd.run", "blockd.cli", "blockd.daemon", "blockd.demo")
RULES = (
    Rule(
        "protocol cores are sans-IO",
        (*PURE, *PURE_JOBS, "blockd.block.qcow2.format", "blockd.block.dirty"),
        ("trio", "socket", "asyncio", "threading"),
        "the QMP and NBD cores, the job tables, the qcow2 math and dirty bitmaps are pure: "
        "bytes or values in, values out; the trio edge drives them",
    ),
    Rule(
        "protocol cores know no block layer",
        ("blockd.qmp", "blockd.nbd"),
        ("blockd.block", "blockd.jobs", "blockd.commands", "blockd.client", *DAEMON),
        "a protocol core is reused by servers and clients alike",
    ),
    Rule(
        "the block layer is below jobs and commands",
        ("blockd.block",),
        ("blockd.jobs", "blockd.commands", "blockd.qmp", "blockd.client", "blockd.events", *DAEMON),
        "jobs and commands drive the block layer, never the other way round",
    ),
    Rule(
        "the block core and helpers do not pick a driver by class",
        ("blockd.block",),
        (
            "blockd.block.drivers.file",
            "blockd.block.drivers.raw",
            "blockd.block.drivers.blkdebug",
            "blockd.block.drivers.copy_on_read",
            "blockd.block.drivers.job_filters",
            "blockd.block.qcow2.driver",
        ),
        "they ask the driver through its interface (blockd.block.driver); only the driver "
        "table (blockd.block.drivers) names the classes",
        except_=("blockd.block.drivers", "blockd.block.qcow2"),
    ),
    Rule(
        "drivers are not built on the graph",
        (
            "blockd.block.drivers",
            "blockd.block.qcow2",
            "blockd.block.host",
            "blockd.block.names.filename",
        ),
        ("blockd.block.graph", "blockd.block.permissions"),
        "only the graph opens and links nodes; drivers see their node and its children",
    ),
    Rule(
        "the job engine knows no job algorithm",
        ENGINE,
        ("blockd.jobs.stream", "blockd.jobs.commit", "blockd.jobs.mirror"),
        "the engine runs any job through the Job seams; stream, commit and mirror plug in",
    ),
    Rule(
        "jobs know no commands",
        ("blockd.jobs",),
        ("blockd.commands", "blockd.client", *DAEMON),
        "commands validate and start jobs; job algorithms do not reply to anyone",
    ),
    Rule(
        "commands are not the daemon's edge",
        ("blockd.commands",),
        ("blockd.server", "blockd.run", "blockd.cli", "blockd.client"),
        "a handler acts on the Daemon state; sockets and processes are the edge's",
    ),
    Rule(
        "the client is a QMP client only",
        ("blockd.client",),
        (
            "blockd.block",
            "blockd.jobs",
            "blockd.commands",
            "blockd.server",
            "blockd.daemon",
            "blockd.run",
            "blockd.qmp",
        ),
        "blockctl drives blockd or any qemu-storage-daemon over the wire",
    ),
)


def _driver_rule_violations() -> list[str]:
    """Each driver module imports no other driver module (the table aside)."""
    drivers = [m for m in MODULES if _within(m, "blockd.block.drivers") and m.count(".") == 3]
    families = {m: m for m in drivers} | {
        m: "blockd.block.qcow2" for m in MODULES if _within(m, "blockd.block.qcow2")
    }
    bad = []
    for module, family in families.items():
        for target in EDGES[module]:
            other = families.get(target)
            if other is not None and other != family:
                bad.append(f"{module} -> {target}")
    return bad


@pytest.mark.parametrize("rule", RULES, ids=[r.name for r in RULES])
def test_rule(rule: Rule) -> None:
    bad = sorted(
        f"{module} -> {target}"
        for module in MODULES
        if rule.applies(module)
        for target in IMPORTS[module]
        if any(_within(target, b) for b in rule.banned)
    )
    assert not bad, f"{rule.name} ({rule.why}):\n  " + "\n  ".join(bad)


def test_drivers_import_no_other_driver() -> None:
    bad = _driver_rule_violations()
    assert not bad, "a driver imports another driver:\n  " + "\n  ".join(bad)


def test_no_import_cycles() -> None:
    # A package's __init__ importing its own modules is how packages re-export: not a cycle
    # unless a module imports the package back.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(EDGES[module]):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n  " + "\n  ".join(" -> ".join(c) for c in cycles)


def test_every_package_says_what_lives_there() -> None:
    missing = [
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("__init__.py")
        if ast.get_docstring(ast.parse(path.read_text())) is None
    ]
    assert not missing, f"write a docstring in: {missing}"


def test_rules_name_real_modules() -> None:
    # a rule about a module that no longer exists protects nothing
    names = {p for r in RULES for p in (*r.sources, *r.except_)} - {"blockd.nbd"}
    stale = sorted(n for n in names if not any(_within(m, n) for m in MODULES))
    assert not stale, stale
