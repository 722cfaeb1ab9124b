"""Shared test fixtures. GPU tests carry @pytest.mark.gpu and are skipped, with the reason
(no CuPy, no driver, no device), where no usable GPU is found."""
import zlib

import numpy as np
import pytest

from textgpt2.device import gpu_status


def pytest_collection_modifyitems(config, items):
    ok, reason = gpu_status()
    if ok:
        return
    skip = pytest.mark.skip(reason=f"GPU test skipped: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request):
    """A NumPy generator seeded from the test's name: fresh inputs per test, reproducible."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture
def cp():
    import cupy
    return cupy


def rel_err(x, ref):
    """||x - ref|| / ||ref|| in float64 (NaN anywhere gives NaN, which fails any comparison)."""
    x = np.asarray(x, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    denom = np.linalg.norm(ref)
    return float(np.linalg.norm(x - ref) / (denom if denom > 0 else 1.0))
