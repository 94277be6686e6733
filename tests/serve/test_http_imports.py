"""The HTTP layer has no import cycle: each router module imports alone, without the app that includes it, and no
module the app imports (at any depth, function-level imports included) imports the app back."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import glmkit.serve

SERVE = Path(glmkit.serve.__file__).parent


def relative_imports(path: Path) -> set[str]:
    """Sibling modules ``path`` imports at run time (``if TYPE_CHECKING:`` blocks left out)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and id(node) not in skipped:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
    return found & {p.stem for p in SERVE.glob("*.py")}


def test_nothing_the_app_imports_imports_it_back():
    graph = {p.stem: relative_imports(p) for p in SERVE.glob("*.py")}
    assert {"http_common", "openai_api", "triton_http"} <= graph["app"]
    reached, todo = set(), ["app"]
    while todo:
        for dep in graph[todo.pop()] - reached:
            reached.add(dep)
            todo.append(dep)
    assert "app" not in reached, sorted(m for m in reached if "app" in graph[m])


@pytest.mark.parametrize("router", ["openai_api", "triton_http", "metrics", "http_common"])
def test_each_router_module_imports_alone(router):
    code = f"import sys, glmkit.serve.{router}; print('glmkit.serve.app' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"  # the router did not need the app to import
