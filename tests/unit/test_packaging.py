"""Packaging (issue 15 §6/§7): the wheel's package list, the slim base dependencies, the extras
the README and CI install, and the license. Reads pyproject.toml; builds nothing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11 (CI runs 3.11)


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_explicit_package_list_names_every_package_and_ships_bench_as_lorainv_bench() -> None:
    st = pyproject()["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "lorainv").rglob("__init__.py")} | {
        "lorainv_bench"
    }
    assert set(st["packages"]) == on_disk
    assert st["package-dir"] == {"lorainv_bench": "bench"} and (ROOT / "bench" / "__init__.py").exists()


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower()


def test_base_dependencies_are_what_fuzz_needs_and_torch_is_not_capped() -> None:
    deps = pyproject()["project"]["dependencies"]
    assert sorted(map(_name, deps)) == ["hypothesis", "numpy", "safetensors", "torch"]
    (torch,) = [d for d in deps if _name(d) == "torch"]
    assert "<" not in torch  # no cap without a measured incompatibility


def test_pytest_and_xdist_are_in_the_test_extra_only() -> None:
    extras = pyproject()["project"]["optional-dependencies"]
    assert {"pytest", "pytest-xdist"} <= set(map(_name, extras["test"]))
    assert set(extras) >= {"hf", "triton", "redis", "ray", "bench", "dev", "test"}


def test_every_extra_installed_by_the_readme_and_ci_exists_and_the_readme_explains_each() -> None:
    extras = set(pyproject()["project"]["optional-dependencies"])
    readme = (ROOT / "README.md").read_text()
    texts = [readme, (ROOT / ".ci" / "run").read_text(), (ROOT / "ci" / "github-actions.yml").read_text()]
    found = {x.strip() for t in texts for m in re.findall(r'-e "\.\[([^\]]+)\]"', t) for x in m.split(",")}
    used = {x for x in found if re.fullmatch(r"[a-z][a-z0-9-]*", x)}  # not the README's placeholder NAME,...
    assert used and used <= extras
    for extra in extras:  # one row per extra in the README's extras table
        assert re.search(rf"^\| `{extra}` \|", readme, re.MULTILINE), extra


def test_license_file_is_shipped() -> None:
    project = pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
