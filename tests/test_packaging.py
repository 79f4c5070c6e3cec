"""Packaging: the package list in pyproject.toml is the source tree's, and a wheel ships
the bundled data, which the installed package finds with no checkout beside it."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
DATA_FILES = ("mnist.npz", "fsdd.npz", "mustard_text.json.gz", "README.md")


def _config():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_package_list_is_the_source_tree():
    from setuptools import find_packages

    listed = set(_config()["packages"])
    assert listed == {*find_packages(str(ROOT), include=["lepton_mm*"]),
                      "lepton_mm._bundled_data"}, "update [tool.setuptools] packages"
    assert _config()["package-dir"] == {"lepton_mm._bundled_data": "data"}


@pytest.mark.slow
def test_wheel_ships_the_data_and_the_installed_package_reads_it(tmp_path):
    build = subprocess.run(
        # Build isolation (pip fetches pyproject's build requirements): a fresh venv's
        # own setuptools may predate the >= 77 that the project's metadata needs.
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q",
         "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("lepton_mm-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for name in DATA_FILES:
            assert f"lepton_mm/_bundled_data/{name}" in names
        sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "lepton_mm").rglob("*.py")}
        assert sources <= names, sorted(sources - names)
        site = tmp_path / "site"
        archive.extractall(site)  # a pure-Python wheel: unpacking it is installing it

    # Outside the checkout, with the unpacked wheel first on the path: no data/ beside
    # the package, so the loaders must find (and verify) the shipped copy.
    env = {k: v for k, v in os.environ.items() if k != "LEPTON_MM_DATA"}
    env["PYTHONPATH"] = str(site)
    probe = subprocess.run([sys.executable, "-c", (
        "import lepton_mm, lepton_mm.data as d\n"
        "print(lepton_mm.__file__)\n"
        "print(d.resolve_data_dir()[1])\n"
        "print(len(d.load_mnist().y_train), len(d.load_fsdd().label), "
        "len(d.load_mustard().labels))\n")],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path, env=env)
    assert probe.returncode == 0, probe.stderr[-3000:]
    module, source, sizes = probe.stdout.strip().splitlines()
    assert Path(module).is_relative_to(site)
    assert source == "installed package data"
    assert [int(n) for n in sizes.split()] == [60000, 3000, 690]
