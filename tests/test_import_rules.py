"""The package dependency rules of the house style, checked on the source.

    protocol  <- ingest, alerts, storage, tools
    geofence  <- alerts
    everything <- the application wiring (tools/cli.py and the modules it names as wiring)

protocol is sans-IO (no trio, sockets, psycopg or clock); only ingest touches sockets; only
storage imports psycopg.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "ingest", "geofence", "alerts", "storage", "tools")

# Which of our own packages each package may import.
ALLOWED_PROJECT_IMPORTS = {
    "protocol": set(),
    "geofence": {"protocol"},
    "alerts": {"protocol", "geofence"},
    "storage": {"protocol"},
    "ingest": {"protocol"},
    "tools": {"protocol"},
}
# The terminal simulator is a TCP client by nature (the load generator of the benchmarks);
# it alone outside ingest may open sockets, and only towards loopback addresses.
SOCKET_CLIENTS = {"tools/simulate.py"}
# The application wiring may import everything.
WIRING = {
    "tools/cli.py",
    "tools/serve_cmd.py",
    "tools/db_cmd.py",
    "tools/export_cmd.py",
    "tools/masterdata_cmd.py",
    "tools/vehicles_cmd.py",
    "tools/fences_cmd.py",
    "tools/filings_cmd.py",
    "tools/alerts_cmd.py",
    "tools/report_cmd.py",
    "tools/rules_service.py",
    "tools/rules_db.py",
    "tools/rules_consumer.py",
    "tools/rules_cmd.py",
    "tools/terminal_registry.py",
    "tools/terminals_cmd.py",
    "tools/access_db.py",
    "tools/console_db.py",
    "tools/users_cmd.py",
    "tools/tokens_cmd.py",
    "tools/audit_cmd.py",
}

SOCKET_MODULES = {"socket", "socketserver", "asyncio", "selectors", "ssl"}
# Modules that import ssl only to build the context urllib's HTTPS checks certificates with:
# they open no socket of their own.
TLS_CONTEXT_MODULES = {"tools/operator_client.py"}
CLOCK_MODULES = {"time"}


def _modules(package: str) -> Iterator[Path]:
    yield from sorted((ROOT / package).rglob("*.py"))


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _imports(path: Path) -> Iterator[tuple[str, int]]:
    """Imported modules, and ``trio.socket`` reached as an attribute (``trio.socket.socket``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _dotted(node) == "trio.socket":
            yield "trio.socket", node.lineno
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno
            for alias in node.names:
                yield f"{node.module}.{alias.name}", node.lineno


def _violations(package: str) -> list[str]:
    found = []
    for path in _modules(package):
        rel = path.relative_to(ROOT).as_posix()
        if rel in WIRING:
            continue
        for name, line in _imports(path):
            top = name.split(".")[0]
            where = f"{rel}:{line} imports {name}"
            if top in PACKAGES and top != package and top not in ALLOWED_PROJECT_IMPORTS[package]:
                found.append(where)
            if package == "protocol" and (
                top in {"trio", "psycopg"} | SOCKET_MODULES | CLOCK_MODULES
            ):
                found.append(where)
            if (
                package != "ingest"
                and rel not in SOCKET_CLIENTS
                and not (rel in TLS_CONTEXT_MODULES and top == "ssl")
                and (top in SOCKET_MODULES or name == "trio.socket")
            ):
                found.append(where)
            if package != "storage" and top == "psycopg":
                found.append(where)
            if package in {"geofence"} and top in {"trio", "psycopg"} | SOCKET_MODULES:
                found.append(where)
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_follow_the_house_rules(package: str) -> None:
    assert _violations(package) == []


def test_protocol_never_reads_the_clock() -> None:
    for path in _modules("protocol"):
        text = path.read_text(encoding="utf-8")
        for needle in ("datetime.now", ".now(", "utcnow", "time.time", "monotonic("):
            assert needle not in text, f"{path}: {needle}"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    bad = tmp_path / "x.py"
    bad.write_text(
        "import trio\nfrom storage import writer\ns = trio.socket.socket()\n", encoding="utf-8"
    )
    assert sorted(name for name, _ in _imports(bad)) == [
        "storage",
        "storage.writer",
        "trio",
        "trio.socket",
    ]
