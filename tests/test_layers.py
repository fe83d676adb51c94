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


# distribution name in pyproject -> the module runtime code imports
_IMPORT_NAME = {"pyyaml": "yaml", "prometheus-client": "prometheus_client", "sse-starlette": "sse_starlette",
                "pyrwkv-tokenizer": "pyrwkv_tokenizer"}


def test_runtime_dependencies_are_what_runtime_code_imports():
    """pyproject's dependencies are exactly the third-party modules engine/, server/, kernels/ and goose/ import;
    optional ones (an extra) only where the code imports them optionally."""
    import re
    import sys

    try:
        import tomllib
    except ImportError:                      # Python 3.10
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs):
        return {_IMPORT_NAME.get(n, n.replace("-", "_")) for n in (re.match(r"[\w.-]+", r).group(0).lower()
                                                                      for r in reqs)}
    first_party = {"engine", "server", "kernels", "goose", "bench", "training"}
    imported = {m.split(".")[0] for pkg in ("engine", "server", "kernels", "goose") for p in modules(pkg)
                for m in imports(p)} - set(sys.stdlib_module_names) - first_party
    runtime = names(project["dependencies"])
    optional = set().union(*(names(project["optional-dependencies"][extra]) for extra in ("fast", "redis", "cuda")))
    assert runtime == imported - optional, (f"imported but not a dependency: {imported - optional - runtime}; "
                                            f"a dependency nothing imports: {runtime - imported}")


SERVING_CORE = {"engine.async_engine", "engine.core", "engine.runner", "engine.update", "engine.scheduler",
                "engine.state_pool", "engine.prefix_cache", "engine.embeddings", "engine.streams", "engine.sampling"}


@pytest.mark.parametrize("path", [p for sub in ("model", "formats", "text") for p in modules(f"engine/{sub}")],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_engine_subpackages_do_not_reach_the_serving_core(path):
    """model/, formats/ and text/ are the core's building blocks; they never import it (nor engine/__init__)."""
    bad = {m for m in imports(path) if m in SERVING_CORE or m == "engine"}
    assert not bad, f"{path} imports {bad}"


@pytest.mark.parametrize("package", ["engine", "server", "kernels"])
def test_product_code_imports_no_tools(package):
    """The command line, benchmarks, training and tests sit on top: engine/, server/ and kernels/ import none."""
    for path in modules(package):
        bad = {m for m in imports(path) if m.split(".")[0] in {"goose", "bench", "training", "tests"}}
        assert not bad, f"{path} imports {bad}"


@pytest.mark.parametrize("package", ["engine", "server", "kernels", "goose", "bench"])
def test_no_private_names_cross_modules(package):
    """`from x import _name` across modules hides a dependency on another module's internals."""
    for path in modules(package):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module != "__future__":
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path} imports private {private} from {node.module}"
