"""One fixture both test folders' conftests import (each folder has its own conftest module)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def exports_in_a_temporary_folder(tmp_path_factory):
    """Encoder exports (built by `--runtime auto` on the CPU) go to this run's temporary folder, not ~/.cache:
    the first test that needs one builds it (about 30 s), the rest reuse it."""
    old = os.environ.get("SAMUNET_CACHE_DIR")
    os.environ["SAMUNET_CACHE_DIR"] = str(tmp_path_factory.mktemp("samunet_home"))
    yield
    if old is None:
        os.environ.pop("SAMUNET_CACHE_DIR", None)
    else:
        os.environ["SAMUNET_CACHE_DIR"] = old
