"""A plain (non-editable) install finds what the package reads at run time: conf/ travels in the
wheel as unclip/conf, and unclip.resources finds it there, not in a source tree."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "unclip", "conf")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the tree (so no build/ or egg-info lands in the repo)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["--no-index", "-w", str(root / "out"), str(src)],
        check=True,
        capture_output=True,
    )
    return next((root / "out").glob("unclip-*.whl"))


def test_wheel_carries_the_configs_and_every_subpackage(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "unclip/conf/clip_arch/unclip-tiny.json",
        "unclip/conf/train.yaml",
        "unclip/conf/sample.yaml",
        "unclip/conf/demo.yaml",
        "unclip/conf/model/prior_diffusion.yaml",
        "unclip/resources.py",
        "unclip/sampling/pipeline.py",
        "unclip/diffusion/samplers.py",
    ):
        assert needed in names, needed
    packages = {Path(n).parent.as_posix() for n in names if n.endswith("__init__.py")}
    on_disk = {
        p.parent.relative_to(REPO).as_posix() for p in (REPO / "unclip").rglob("__init__.py")
    }
    assert on_disk <= packages


def test_installed_wheel_finds_its_own_clip_architectures(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import open_clip\n"
        "from unclip.resources import conf_path\n"
        "import unclip.clip\n"
        "print(conf_path('clip_arch'))\n"
        "print(open_clip.get_model_config('unclip-tiny')['embed_dim'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    arch_dir, embed_dim = out.stdout.split()
    assert Path(arch_dir) == site / "unclip" / "conf" / "clip_arch"
    assert int(embed_dim) == 64
