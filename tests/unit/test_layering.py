"""Structure rules. The import rules are import-linter contracts in pyproject.toml (services
independent of each other, libs below services and cli, the API's layers, one module importing
the Kubernetes client, the provisioner's pure modules), checked by `make lint` and here; what
is not an import between modules (SQL built only in repositories) is checked by hand."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_import_contracts_are_kept() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from importlinter.cli import lint_imports; "
            "sys.exit(lint_imports(no_cache=True, no_logo=True))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


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
