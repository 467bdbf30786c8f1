"""No service imports another service's package: they meet only through libs/contracts."""

from __future__ import annotations

import ast
from pathlib import Path

SERVICES = {
    "gateway": "taskbus.gateway",
    "session-manager": "taskbus.session_manager",
    "runtime-runner": "taskbus.runtime_runner",
    "event-store": "taskbus.event_store",
}
# What services may import from the workspace besides themselves.
SHARED = ("taskbus.contracts",)


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def test_services_import_only_themselves_and_contracts(repo_root: Path) -> None:
    checked = 0
    violations = []
    for folder, package in SERVICES.items():
        for path in (repo_root / "services" / folder).rglob("*.py"):
            checked += 1
            for module in _imported_modules(path):
                if not module.startswith("taskbus."):
                    continue
                if module == package or module.startswith(package + "."):
                    continue
                if any(module == s or module.startswith(s + ".") for s in SHARED):
                    continue
                if "/tests/" in path.as_posix() and module.startswith("taskbus.devtools"):
                    continue  # tests may use the shared test tools (nats-server, scripted model)
                violations.append(f"{path.relative_to(repo_root)} imports {module}")
    assert checked > 0
    assert violations == []


def test_contracts_import_no_service(repo_root: Path) -> None:
    paths = list((repo_root / "libs" / "contracts" / "src").rglob("*.py"))
    assert paths
    for path in paths:
        imported = _imported_modules(path)
        assert not any(m.startswith(tuple(SERVICES.values())) for m in imported), path
