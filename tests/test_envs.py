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


SYSTEM_PACKAGES = REPO / "tests" / "system-packages.sh"


def system_packages(packages: str, as_nobody: bool = False, **env: str):
    """tests/system-packages.sh (what `make test` runs first) for ``packages``."""
    import os
    import subprocess

    command = ["bash", str(SYSTEM_PACKAGES)]
    if as_nobody and os.geteuid() == 0:
        command = ["runuser", "-u", "nobody", "--", *command]
    environ = {"PATH": os.environ["PATH"], "SCPRINT_SYSTEM_PACKAGES": packages, **env}
    return subprocess.run(command, env=environ, capture_output=True, text=True, timeout=60)


def test_system_packages_already_installed_is_a_no_op():
    done = system_packages("bash coreutils")  # installed everywhere the script can run
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_system_packages_it_cannot_install_are_named_in_one_line_and_fail_only_in_ci():
    missing = "bash scprint-no-such-package"
    outside_ci = system_packages(missing, as_nobody=True)
    assert outside_ci.returncode == 0, outside_ci.stderr
    lines = outside_ci.stderr.splitlines()
    assert len(lines) == 1 and "scprint-no-such-package), " in lines[0]  # not root / no apt
    assert "apt-get install -y scprint-no-such-package" in lines[0]
    ci = system_packages(missing, as_nobody=True, SCPRINT_REQUIRE_SYSTEM_PACKAGES="1")
    assert ci.returncode == 1 and ci.stderr == outside_ci.stderr


def test_every_pin_is_required_by_the_project_or_its_dependencies():
    """A pin that nothing installed requires (a dependency dropped, its pins kept) fails."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    required: set[str] = set()
    todo = [Requirement("scprint-pipeline[dev,cuda]")]
    while todo:
        requirement = todo.pop()
        name, extras = normalise(requirement.name), sorted(requirement.extras)
        if (name, *extras) in required:
            continue
        try:
            dist = distribution(requirement.name)
        except PackageNotFoundError:
            continue  # e.g. flash-attn (the cuda extra) on a machine without a GPU
        required |= {name, (name, *extras)}
        for line in dist.requires or []:
            sub = Requirement(line)
            if sub.marker is None or any(
                sub.marker.evaluate({**default_environment(), "extra": e}) for e in ["", *extras]
            ):
                todo.append(sub)
    unused = sorted(set(constraints()) - required)
    assert not unused, f"constraints.txt pins {unused}, which nothing installed requires"
