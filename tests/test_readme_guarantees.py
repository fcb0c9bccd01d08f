"""README's "Guarantees" table names the tests behind each promise; those tests must exist.

A renamed or deleted test would otherwise leave a promise that nothing checks.
"""

from __future__ import annotations

import ast
import fnmatch
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def _guarantees_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Guarantees")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_every_area_names_tests_and_every_named_test_exists() -> None:
    lines = _guarantees_section().splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| area ")]
    assert len(rows) >= 10, "the table lost rows"
    for row in rows:
        area, backed_by = row.split(" | ")[0].strip("| "), row.rstrip(" |").split(" | ")[-1]
        refs = re.findall(r"`(test_[\w]+\.py)(?:::([\w*]+))?`", backed_by)
        assert refs, f"{area}: no test named"
        for file, name in refs:
            path = TESTS / file
            assert path.is_file(), f"{area}: {file} does not exist"
            names = _test_names(path)
            assert names, f"{area}: {file} has no tests"
            if name:
                assert fnmatch.filter(names, name), f"{area}: {file}::{name} does not exist"
