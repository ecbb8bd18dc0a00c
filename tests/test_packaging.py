"""A plain (non-editable) install works from any directory: the shipped specs are found, the zoo
imports as ``partitioner.zoo``, no top-level ``models`` module is installed, and every module
of the source tree is in the wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import importlib.util, json, sys
import partitioner, partitioner.zoo
from partitioner.ir.spec import list_specs, load_spec
from partitioner.zoo import list_models
print(json.dumps({"file": partitioner.__file__, "zoo": partitioner.zoo.__file__, "specs": list_specs(),
                  "loaded": load_spec("server-cpu-2gpu").name, "models": [n for n, _ in list_models()],
                  "top_models": importlib.util.find_spec("models") is not None}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # with a recent enough setuptools here (pyproject.toml asks >= 77), build with it (no download);
    # else pip builds in an isolated environment
    try:
        recent = int(metadata.version("setuptools").split(".")[0]) >= 77
    except (metadata.PackageNotFoundError, ValueError):
        recent = False
    isolation = ["--no-build-isolation"] if recent else []
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(out),
                        str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (whl,) = out.glob("partitioner-*.whl")
    return whl


def test_wheel_holds_every_module_the_specs_and_the_zoo(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "partitioner").rglob("*.py")}
    assert source <= names, sorted(source - names)[:5]
    specs = {f"partitioner/hw_specs/{p.name}" for p in (ROOT / "hw_specs").glob("*.yaml")}
    assert specs and specs <= names
    zoo = {f"partitioner/zoo/{p.name}" for p in (ROOT / "models").glob("*.py")}
    assert zoo <= names
    assert not [n for n in names if n.split("/")[0] == "models"]  # no top-level `models` package
    meta = next(n for n in names if n.endswith("entry_points.txt"))
    entry = zipfile.ZipFile(wheel).read(meta).decode()
    assert "partitioner.cli.main:main" in entry and "partitioner.dropin:dynamo_backend" in entry


def test_installed_wheel_works_from_any_directory(wheel, tmp_path):
    target = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                        str(wheel)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PARTITIONER_SPECS")}
    env["PYTHONPATH"] = str(target)
    r = subprocess.run([sys.executable, "-c", CHECK], cwd=elsewhere, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(target)) and got["zoo"].startswith(str(target))
    assert set(got["specs"]) == {p.stem for p in (ROOT / "hw_specs").glob("*.yaml")}
    assert got["loaded"] == "server-cpu-2gpu" and "resnet50" in got["models"]
    assert not got["top_models"]
