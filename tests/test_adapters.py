"""scprint/adapters: each library's private API behind a version check that fails clearly
on a version we did not test (the adapters themselves run in the lamin, loader and W&B
tests)."""

from __future__ import annotations

import importlib
import tomllib

import pytest
from conftest import REPO

from scprint.adapters import check_version
from scprint.io import StageError


def test_installed_versions_pass_and_all_adapters_import():
    for name in ("lamindb", "scdataloader", "wandb"):
        importlib.import_module(f"scprint.adapters.{name}")


def test_an_untested_version_fails_with_the_fix(monkeypatch):
    monkeypatch.delenv("SCPRINT_ALLOW_UNTESTED", raising=False)
    with pytest.raises(StageError) as err:
        check_version("wandb", ">=0.17,<0.32", installed="0.40.1")
    message = str(err.value)
    assert "wandb 0.40.1 is installed" in message and "wandb>=0.17,<0.32" in message
    assert "pip install -c constraints.txt" in message and "SCPRINT_ALLOW_UNTESTED=1" in message
    assert check_version("scdataloader", "==2.1.3", installed="2.1.3") == "2.1.3"


def test_allow_untested_turns_the_failure_into_a_warning(monkeypatch, caplog):
    monkeypatch.setenv("SCPRINT_ALLOW_UNTESTED", "1")
    assert check_version("lamindb", "==2.1.1", installed="2.2.0") == "2.2.0"
    assert "lamindb 2.2.0 is installed" in caplog.text


def test_pyproject_bounds_wandb_as_its_adapter_was_tested():
    from scprint.adapters.wandb import TESTED

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"wandb{TESTED}" in deps
