"""Unit tests train no models: they run in well under a minute on a clone with a built venv.

The trained demo family is for integration and cluster tests; a unit test that asks for it fails
here, pointing at the random-weight families that build in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def kuberay_dir() -> Path:
    """The KubeRay CRD schemas the offline manifest validation reads (bundled with the package)."""
    from eft_serve.k8s.validate import kuberay_schema_dir

    try:
        return kuberay_schema_dir()
    except FileNotFoundError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def demo_family():
    pytest.fail(
        "unit tests train no models: build a random-weight family with eft_serve.testing.arch_families "
        "(or move the test to tests/integration)"
    )
