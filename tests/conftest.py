"""Session-wide fixtures: a real Redis (see conftest_redis.py) and the demo model family."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

pytest_plugins = ["conftest_redis"]


@pytest.fixture(scope="session")
def demo_family():
    """The built-in demo family, built once (cached across runs in ~/.cache or $EFT_DEMO_DIR)."""
    from eft_serve.demo.family import ensure_demo_family

    return ensure_demo_family()
