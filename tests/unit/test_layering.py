"""Structure rules: services import no other service; SQL stays in repository modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = sorted(p.name for p in (ROOT / "services").iterdir() if (p / "__init__.py").exists())


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("service", SERVICES)
def test_no_service_imports_another(service: str) -> None:
    for path in (ROOT / "services" / service).rglob("*.py"):
        for module in imports(path):
            parts = module.split(".")
            if parts[0] == "services" and len(parts) > 1:
                assert parts[1] == service, f"{path.relative_to(ROOT)} imports {module}"


def test_libs_common_imports_no_service_and_no_cli() -> None:
    for path in (ROOT / "libs").rglob("*.py"):
        for module in imports(path):
            assert module.split(".")[0] not in {"services", "cli"}, f"{path} imports {module}"


def test_sql_statements_live_in_repository_modules() -> None:
    builders = {"select", "insert", "update", "delete"}
    for path in (ROOT / "services").rglob("*.py"):
        if path.name == "repository.py" or "migrations" in path.parts:
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "sqlalchemy":
                used = {alias.name for alias in node.names} & builders
                assert not used, (
                    f"{path.relative_to(ROOT)} builds SQL ({used}); move it to a repository"
                )
