"""Import direction: server -> engine (its public API) -> kernels, never back; engine stays HTTP-free."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HTTP = {"fastapi", "starlette", "pydantic", "uvicorn", "prometheus_client", "sse_starlette", "httpx"}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def modules(package: str):
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", modules("kernels"), ids=lambda p: p.name)
def test_kernels_import_only_torch(path):
    bad = {m for m in imports(path) if m.split(".")[0] in {"engine", "server", "training"} | HTTP}
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", modules("engine"), ids=lambda p: p.name)
def test_engine_is_http_free(path):
    bad = {m for m in imports(path) if m.split(".")[0] in {"server", "training"} | HTTP}
    assert not bad, f"{path.name} imports {bad}"


def test_scheduler_is_pure_policy():
    assert not {m for m in imports(ROOT / "engine" / "scheduler.py") if m.split(".")[0] in {"torch", "kernels"}}


@pytest.mark.parametrize("path", modules("server"), ids=lambda p: p.name)
def test_server_uses_the_engine_public_api(path):
    bad = {m for m in imports(path) if m.startswith("engine.") or m.startswith("kernels")}
    assert not bad, f"{path.name} reaches engine internals: {bad}"
