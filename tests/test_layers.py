"""The layers hold: imports flow down only (service.py -> serving -> slides -> config -> models; training,
synthetic and the load tests apart), as pyproject.toml's import-linter contracts state them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from loadtests.servers import REPO_ROOT

PACKAGES = ("serving", "slides", "config", "models", "training", "synthetic", "loadtests", "deploy", "docscheck")


def test_the_import_contracts_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "broken" not in result.stdout.lower().replace("0 broken", "")


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_package_imports_the_service_module():
    """service.py is the top: import-linter takes packages only, so this one rule is read here."""
    sources = [path for package in PACKAGES for path in (REPO_ROOT / package).rglob("*.py")]
    importers = [str(path.relative_to(REPO_ROOT)) for path in sources
                 if any(name == "service" or name.startswith("service.") for name in _imported_modules(path))]
    assert importers == []
