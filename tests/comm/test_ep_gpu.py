"""Expert parallelism on one GPU: the ``nccl`` communicator over gloo with 2 and 4 processes sharing
the GPU (CUDA tensors, the triton backend, bf16 under the tolerance rule and fp32 within 1e-5), and the
all-to-all bookkeeping at W = 1 on CUDA: bit-identical to loopback, and in sync-free mode free of host
syncs and captured in a CUDA graph. Real NCCL needs one GPU per rank (tests/comm/test_nccl_gpu.py)."""

import copy

import pytest
import torch

from flashfusemoe import MoELayer
from flashfusemoe.comm import AllToAllCommunicator
from tests.comm.test_gloo import run_ep_check

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


class _NoTransport(AllToAllCommunicator):
    """W = 1 with no transport: the all-to-all communicators' own bookkeeping, on CUDA."""

    def __init__(self, sync_free: bool) -> None:
        self.rank, self.world_size, self.sync_free = 0, 1, sync_free

    def _all_to_all(self, send_SX, send_splits, recv_splits, what):
        return send_SX.clone()


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
    ep = copy.deepcopy(ref).shard_experts(None, communicator=_NoTransport(sync_free))
    x = torch.randn(500, 256, device="cuda").bfloat16()
    g = torch.randn(500, 256, device="cuda").bfloat16()
    for got, want in zip(_step(ep, x, g), _step(ref, x, g), strict=True):
        assert torch.equal(got, want)


def test_sync_free_ep_path_has_no_host_sync_and_replays_in_a_cuda_graph():
    ref = _layer()
    ep = copy.deepcopy(ref).shard_experts(None, communicator=_NoTransport(True))
    static_x = torch.randn(512, 256, device="cuda").bfloat16().requires_grad_()
    static_g = torch.randn(512, 256, device="cuda").bfloat16()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (Triton compiles) off the capture
        for _ in range(2):
            ep(static_x)[0].backward(static_g)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.set_sync_debug_mode("error")
    try:
        ep(static_x)[0].backward(static_g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = ep(static_x)[0]
        static_out.backward(static_g)
    for seed in range(2):
        torch.manual_seed(10 + seed)
        new_x = torch.randn(512, 256, device="cuda").bfloat16()
        for p in [static_x, *ep.parameters()]:
            p.grad.zero_()
        static_x.data.copy_(new_x)
        graph.replay()
        ref.zero_grad(set_to_none=True)
        want = _step(ref, new_x, static_g)
        assert torch.equal(static_out, want[0]) and torch.equal(static_x.grad, want[1])
        assert torch.equal(ep.w_up.grad, ref.w_up.grad) and torch.equal(
            ep.gate_weight.grad, ref.gate_weight.grad
        )
