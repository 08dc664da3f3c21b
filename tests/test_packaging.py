"""What ships: the ``ierf`` and ``ierf-client`` wheels built from this checkout (offline, with the running
interpreter's setuptools, ~3 s each) and installed somewhere other than the repository."""

from __future__ import annotations

import ast
import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLIENT = REPO / "clients" / "python"
# what a fresh environment cannot tell from installed metadata: the SDK is not on PyPI
_LOCAL_DISTS = {"ierf_client": "ierf-client", "ierf_proto": "ierf-client"}


def _build_wheel(project: Path, parts: list[str], out: Path) -> Path:
    """Copy the project's files (not a stale egg-info or build/) and build its wheel without network."""
    pytest.importorskip("setuptools")
    src = out / "src"
    src.mkdir()
    for part in parts:
        source = project / part
        if source.is_dir():
            shutil.copytree(source, src / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif source.is_file():
            shutil.copy2(source, src / part)
    dist = out / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(dist), str(src)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    (wheel,) = dist.glob("*.whl")
    return wheel


def _license_like(path: Path) -> bool:
    return path.name.upper().startswith(("LICENSE", "LICENCE", "COPYING", "NOTICE"))


@pytest.fixture(scope="module")
def ierf_wheel(tmp_path_factory) -> Path:
    parts = ["pyproject.toml", "README.md", "service"] + [p.name for p in REPO.iterdir() if _license_like(p)]
    return _build_wheel(REPO, parts, tmp_path_factory.mktemp("ierf_wheel"))


@pytest.fixture(scope="module")
def client_wheel(tmp_path_factory) -> Path:
    parts = ["pyproject.toml", "README.md", "src"] + [p.name for p in CLIENT.iterdir() if _license_like(p)]
    return _build_wheel(CLIENT, parts, tmp_path_factory.mktemp("client_wheel"))


def _metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        return Parser().parsestr(z.read(name).decode())


def _requirement_name(line: str) -> str:
    name = line.split(";")[0]
    for stop in "<>=!~[ (":
        name = name.split(stop)[0]
    return name.strip().lower().replace("_", "-").replace(".", "-")


def test_every_third_party_import_of_the_ierf_wheel_is_a_declared_requirement(ierf_wheel: Path) -> None:
    """ierf.serving (protocol.py, convert.py, deployments.py) imports ``ierf_proto`` and ``ierf --server``
    (remote_backend.py) imports ``ierf_client``, but neither ships in the ierf wheel and no extra requires
    ierf-client: ``pip install 'ierf[serve]'`` from the built wheel gives ``python -m ierf.serving serve``
    that dies with ``ModuleNotFoundError: No module named 'ierf_proto'``. Only the Makefile/Dockerfile,
    which also install clients/python by hand, hide it."""
    with zipfile.ZipFile(ierf_wheel) as z:
        sources = {n: z.read(n).decode() for n in z.namelist() if n.endswith(".py")}
    shipped = {n.split("/")[0] for n in sources}
    imported: dict[str, str] = {}
    for name, text in sources.items():
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in shipped and top != "__future__":
                    imported.setdefault(top, name)
    declared = {_requirement_name(r) for r in _metadata(ierf_wheel).get_all("Requires-Dist") or []}
    providers = importlib.metadata.packages_distributions()
    undeclared = {}
    for top, where in imported.items():
        dists = {_requirement_name(d) for d in providers.get(top, [])} or {_LOCAL_DISTS.get(top, top)}
        if not dists & declared:
            undeclared[top] = (sorted(dists), where)
    assert not undeclared, f"imported by the ierf wheel but required by none of its extras: {undeclared}"


def test_the_ierf_wheel_is_marked_typed(ierf_wheel: Path) -> None:
    """The engine is a typed Python API (README 'SRD engine (Python API)', annotated throughout) and the SDK
    ships py.typed, but the ierf wheel has no ``ierf/py.typed`` (and package-data only globs
    json/txt/pt/yaml, so adding the file alone would not ship it): mypy on a user's ``import ierf`` says
    'module is installed, but missing library stubs or py.typed marker' and checks none of their calls."""
    with zipfile.ZipFile(ierf_wheel) as z:
        assert "ierf/py.typed" in z.namelist()


@pytest.mark.parametrize("which", ["ierf", "ierf-client"])
def test_the_wheels_carry_the_license_they_declare(which: str, request: pytest.FixtureRequest) -> None:
    """Both pyprojects declare ``license = "Apache-2.0"``, yet the repository has no LICENSE file, so neither
    wheel (nor sdist) carries the licence text that Apache-2.0 section 4(a) says every redistribution must
    include (METADATA has no License-File)."""
    wheel = request.getfixturevalue("ierf_wheel" if which == "ierf" else "client_wheel")
    metadata = _metadata(wheel)
    files = metadata.get_all("License-File") or []
    assert files, f"{wheel.name}: License-Expression {metadata['License-Expression']} but no License-File"
    with zipfile.ZipFile(wheel) as z:
        text = "".join(z.read(n).decode(errors="replace") for n in z.namelist() if "/licenses/" in n)
    assert "Apache License" in text


def test_ierf_server_without_the_sdk_says_what_to_install(monkeypatch, capsys) -> None:
    """``ierf --server ADDR models`` from an installed ierf wheel (ierf-client is not one of its
    requirements) ended in a ModuleNotFoundError traceback from remote_backend.py; every other missing
    piece (weights, an unknown model) gets a one-line error naming the fix."""
    from ierf.cli import main

    monkeypatch.setitem(sys.modules, "ierf_client", None)  # as in an environment without the SDK
    status = main(["--server", "127.0.0.1:1", "--timeout", "1", "models"])
    err = capsys.readouterr().err
    assert status != 0
    assert "Traceback" not in err
    assert "ierf-client" in err or "clients/python" in err, err


def test_the_cli_reports_its_version(capsys) -> None:
    """A packager (and a user filing a bug) checks what got installed with ``ierf --version``; the CLI has
    none (argparse: 'the following arguments are required: COMMAND', exit 2), although the version is what
    keys cached values (method_version) and what the server reports as server_version."""
    import ierf
    from ierf.cli import main

    assert main(["--version"]) == 0
    assert ierf.__version__ in capsys.readouterr().out
