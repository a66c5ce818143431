"""envs/*.yaml (the per-rule conda environments of `--software-deployment-method conda`)
pin the same versions as constraints.txt, the frozen set `make install` uses, and the
Python that pyproject.toml requires: a pin changed in one place and not the other fails."""

from __future__ import annotations

import re
import tomllib

import pytest
import yaml
from conftest import REPO

ENVS = sorted((REPO / "envs").glob("*.yaml"))


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, sep, pinned = line.split("#")[0].strip().partition("==")
        if sep:
            pins[normalise(name)] = pinned.strip()
    return pins


def test_every_rule_env_exists():
    used = set()
    for smk in (REPO / "workflow" / "rules").glob("*.smk"):
        used |= set(re.findall(r'"\.\./\.\./(envs/[\w.-]+\.yaml)"', smk.read_text()))
    assert used and used == {str(p.relative_to(REPO)) for p in ENVS}


@pytest.mark.parametrize("env", ENVS, ids=lambda p: p.name)
def test_env_pins_agree_with_constraints_and_pyproject(env):
    spec = yaml.safe_load(env.read_text())
    deps = spec["dependencies"]
    python = next(d for d in deps if isinstance(d, str) and d.startswith("python="))
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert f">={python.removeprefix('python=')}" in requires, (python, requires)
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    pinned = constraints()
    for requirement in pip:
        name, sep, version = requirement.partition("==")
        assert sep, f"{env.name}: {requirement} is not pinned with =="
        assert pinned.get(normalise(name)) == version, (
            f"{env.name} pins {requirement}, constraints.txt {name}=={pinned.get(normalise(name))}"
        )
