"""What a plain ``pip install`` of the project gets."""
from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def test_plain_install_can_build_the_native_op():
    """torch.utils.cpp_extension builds with ninja: without it the native op never builds and
    every CPU call takes the slower torch path."""
    deps = [d.split(">")[0].split("=")[0].split("<")[0].strip() for d in PYPROJECT["project"]["dependencies"]]
    assert "ninja" in deps, deps


def test_no_top_level_bench_package():
    """The benchmarks are run from a checkout; installing a top-level package named ``bench``
    would shadow (or be shadowed by) any other project's."""
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(p.split("*")[0].split(".")[0] == "bench" for p in include), include
