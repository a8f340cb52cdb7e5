"""Test configuration: hypothesis profiles, device markers, the Triton interpreter on CPU.

``HYPOTHESIS_PROFILE=ci`` (default: few examples, no deadline) or ``dev`` (many examples).
Tests marked ``gpu`` / ``multi_gpu`` skip cleanly without CUDA devices; each test starts with an empty
torch.compile cache.
"""

import os

import pytest
import torch

# Without a GPU, Triton kernels run on its CPU interpreter; it reads this when the kernels are defined,
# so it is set before any test module imports flashfusemoe's Triton backend.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False
)
settings.register_profile(
    "dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for item in items:
        if "gpu" in item.keywords and gpus < 1:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
        if "multi_gpu" in item.keywords and gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs two CUDA GPUs"))


@pytest.fixture(autouse=True)
def _fresh_dynamo_cache():
    """Each test starts with no compiled frames: code that one test compiled (MoELayer.forward, say, at
    another dtype) must not count as a recompile (``error_on_recompile``) or toward the cache-size limit
    in the next one."""
    torch._dynamo.reset()
    yield
