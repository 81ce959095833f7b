"""Tests under tests/gpu run only where JAX sees a GPU; elsewhere they are skipped.

Run them on the GPU machine with `tests/gpu/run_on_device.sh`.
"""

import jax
import pytest


def _on_gpu() -> bool:
    return jax.devices()[0].platform == "gpu"


def pytest_collection_modifyitems(config, items):
    if _on_gpu():
        return
    skip = pytest.mark.skip(reason=f"needs a GPU; JAX runs on {jax.devices()[0]}")
    for item in items:
        if "tests/gpu/" in item.nodeid.replace("\\", "/") or item.get_closest_marker(
            "gpu"
        ):
            item.add_marker(skip)
