"""The ``deepep`` communicator on one GPU: DeepEP's intranode Buffer with 2 and 4 gloo processes
sharing it (checked on an H200: dispatch + combine exact). Its normal form equals loopback's and the
EP layer (triton backend, bf16) equals the unsharded one under the tolerance rule, for balanced,
skewed and empty-rank routings. Needs the DeepEP wheel (../shared/tools/deepep-wheel.sh)."""

import pytest

from tests.comm.test_ep_gpu import SHAPE
from tests.comm.test_gloo import run_ep_check

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("world", ["2", "4"])
@pytest.mark.parametrize("routing", [[], ["--skew", "--empty-rank"]], ids=["balanced", "skewed-empty"])
def test_deepep_over_gloo_on_one_gpu_equals_unsharded(world, routing):
    pytest.importorskip("deep_ep", reason="DeepEP is not installed")
    flags = ["--pg", "gloo", "--device", "cuda", "--backend", "triton", "--comm", "deepep", "--dtype", "bf16"]
    run_ep_check([*flags, "--world", world, *SHAPE, *routing], timeout=900, interpret=False)
