"""Expert parallelism on one GPU: the ``nccl`` communicator over gloo with 2 and 4 processes sharing
the GPU (CUDA tensors, the triton backend, bf16 under the tolerance rule and fp32 within 1e-5), and the
all-to-all bookkeeping at W = 1 on CUDA: bit-identical to loopback, and in sync-free mode free of host
syncs and captured in a CUDA graph. Real NCCL needs one GPU per rank (tests/comm/test_nccl_gpu.py)."""

import copy

import pytest
import torch

from flashfusemoe import MoELayer
from flashfusemoe.comm.testing import SelfAllToAll
from tests.comm.test_gloo import run_ep_check
from tests.cuda_graphs import check_graph_replays_match_eager

pytestmark = pytest.mark.gpu

SHAPE = ["--tokens", "300", "--d-model", "256", "--ffn-dim", "512", "--experts", "8", "--top-k", "2"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("world", ["2", "4"])
@pytest.mark.parametrize(
    "routing",
    [[], ["--skew", "--empty-rank"], ["--sync-free", "--skew"]],
    ids=["balanced", "skewed-empty", "sync-free"],
)
def test_gloo_on_cuda_ep_equals_unsharded(dtype, world, routing):
    flags = ["--pg", "gloo", "--device", "cuda", "--backend", "triton", "--world", world, "--dtype", dtype]
    run_ep_check([*flags, *SHAPE, *routing], timeout=900, interpret=False)


def _layer():
    torch.manual_seed(0)
    layer = MoELayer(256, 512, 8, 2, num_shared_experts=1, backend="triton").cuda().to(torch.bfloat16)
    return layer


def _step(layer, x, g):
    x = x.detach().clone().requires_grad_()
    out, _ = layer(x)
    out.backward(g)
    return [out, x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("sync_free", [False, True])
def test_all_to_all_bookkeeping_at_w1_is_bit_identical_to_loopback(sync_free):
    ref = _layer()
    ep = copy.deepcopy(ref).shard_experts(None, communicator=SelfAllToAll(sync_free))
    x = torch.randn(500, 256, device="cuda").bfloat16()
    g = torch.randn(500, 256, device="cuda").bfloat16()
    for got, want in zip(_step(ep, x, g), _step(ref, x, g), strict=True):
        assert torch.equal(got, want)


def test_sync_free_ep_path_has_no_host_sync_and_replays_in_a_cuda_graph():
    ref = _layer()
    ep = copy.deepcopy(ref).shard_experts(None, communicator=SelfAllToAll(True))
    check_graph_replays_match_eager(ep, ref, 512, 256, no_sync=True)
