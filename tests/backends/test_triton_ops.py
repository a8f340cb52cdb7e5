"""The triton backend's custom ops under ``torch.library.opcheck``: schema, fake implementation (shapes,
dtypes and strides torch.compile plans with) and AOT dispatch against the real kernels.

On CPU the kernels run under the Triton interpreter (fp32); with a GPU, on it.
"""

import pytest
import torch

from flashfusemoe.backends.triton.metadata import routing_metadata
from flashfusemoe.backends.triton.quack_gemm import NONE
from flashfusemoe.spec import RouterConfig

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
T, D, F, I, E, K = 7, 8, 12, 6, 3, 2
ops = torch.ops.flashfusemoe


def _inputs(seed=0):
    # no dropped slots: rows past the live count are left unwritten, which opcheck would compare
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    ids = torch.randint(0, E, (T, K), generator=g, dtype=torch.int32)
    w = torch.rand(T, K, generator=g)
    up, down = torch.randn(E, F, D, generator=g), torch.randn(E, D, I, generator=g)
    return [t.to(DEV) for t in (x, ids, w, up, down)]


def _check(op, args):
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_triton_expert_ops_pass_opcheck():
    x, ids, w, up, down = _inputs()
    other_rank = ids.clone()
    other_rank[:3, 0] = -1  # EP: slots whose expert lives elsewhere; buffers sized by the kept slots
    for activation in ("swiglu", "gelu"):  # the activation output has I or F columns
        _check(ops.moe_up_fwd.default, (x, ids, up, activation, T * K, NONE))
        _check(ops.moe_up_fwd.default, (x, other_rank, up, activation, T * K - 3, NONE))
    meta = routing_metadata(ids, E)
    routing = (meta.pos_TK, meta.row_slot_M, meta.row_token_M, meta.bounds_E1)
    h = torch.randn(T * K, F, device=DEV)
    # weight gradient returned, added into a buffer, or not computed (a frozen weight)
    for acc, need in ((None, True), (torch.randn_like(up), True), (None, False)):
        _check(ops.moe_up_bwd.default, (h, x, up, *routing, acc, need, NONE))
    a = torch.randn(T * K, F // 2, device=DEV)
    _check(ops.moe_down_fwd.default, (a, w, down, meta.pos_TK, meta.bounds_E1, NONE))
    grad_out = torch.randn(T, D, device=DEV)
    for h_saved in (h, h.new_empty(0)):  # kept activations, and recompute
        for acc, need in ((None, True), (torch.randn_like(down), True), (None, False)):
            args = (grad_out, h_saved, x, up, w, down, *routing, "swiglu", False, acc, need, NONE)
            _check(ops.moe_down_bwd.default, args)


def test_shared_mlp_recompute_survives_the_compile_partitioner():
    """torch.compile's min-cut partitioner (torch's default budget: it saves what it may) keeps the
    shared MLP's recompute: no [R, F] tensor among the forward's outputs for backward, where without
    recompute it saves h. (Its recompute GEMM is an op of its own: as a plain mm the partitioner merged
    it with the forward's and saved h.)"""
    from torch._functorch import config
    from torch._functorch.aot_autograd import aot_function
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    from flashfusemoe.backends.triton.mlp import expert_mlp

    _check(ops.mlp_up_recompute.default, (torch.randn(T, D, device=DEV), torch.randn(F, D, device=DEV)))
    saved = {}

    def forward_outputs(recompute):
        def fw(gm, _):
            (outs,) = [n.args[0] for n in gm.graph.nodes if n.op == "output"]
            saved[recompute] = [tuple(n.meta["val"].shape) for n in outs]
            return gm

        return fw

    for recompute in (False, True):
        leaves = [torch.randn(*s, device=DEV, requires_grad=True) for s in ((T, D), (F, D), (D, I))]
        f = aot_function(
            lambda x, up, down, r=recompute: expert_mlp(x, up, down, "swiglu", r),
            fw_compiler=forward_outputs(recompute), bw_compiler=lambda gm, _: gm,
            partition_fn=min_cut_rematerialization_partition,
        )  # fmt: skip
        with config.patch(activation_memory_budget=1.0):
            f(*leaves).sum().backward()
    assert (T, F) in saved[False] and (T, F) not in saved[True], saved


@pytest.mark.parametrize("with_grads", [(True, True, True), (True, False, False), (False, True, True)])
def test_triton_router_ops_pass_opcheck(with_grads):
    logits = torch.randn(T, E, device=DEV)
    bias = torch.rand(E, device=DEV)
    _check(ops.router_fwd.default, (logits, bias, RouterConfig(top_k=K).to_op_arg()))
    sigmoid = RouterConfig(
        top_k=K, score_func="sigmoid", renormalize=False, routed_scaling_factor=2.5
    ).to_op_arg()
    ids, *_ = ops.router_fwd.default(logits, None, sigmoid)
    routed = torch.bincount(ids.reshape(-1).long(), minlength=E + 1)
    gw, glb, gz = (
        t if keep else None
        for t, keep in zip((torch.randn(T, K), torch.tensor(0.3), torch.tensor(0.2)), with_grads, strict=True)
    )
    gw, glb, gz = (t.to(DEV) if t is not None else None for t in (gw, glb, gz))
    _check(ops.router_bwd.default, (logits, ids, routed, gw, glb, gz, sigmoid))


@pytest.mark.gpu  # 16-bit output: the Triton interpreter mishandles bf16
def test_triton_router_hi_lo_op_passes_opcheck():
    grad = torch.randn(T, E, device="cuda")
    _check(ops.router_hi_lo.default, (grad, torch.bfloat16))


@pytest.mark.parametrize("recompute", [False, True])
def test_flop_counter_counts_the_expert_ops_like_the_references_matmuls(recompute):
    """FlopCounterMode (and torch.compile's activation memory budget, which ranks recompute by it) sees
    each custom op's GEMMs: the same total as the reference backend's plain matmuls (router GEMM
    included), shared expert too; with recompute ours recomputes only the up projections' h (2*rows*F*D
    more each), the reference its whole MLPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from flashfusemoe import fused_moe

    x, _, _, up, down = _inputs(seed=3)
    gate = torch.randn(E, D, device=DEV)
    leaves = [t.requires_grad_() for t in (x, gate, up, down)]
    shared = dict(  # the shared expert's GEMMs count alike too
        shared_w_up=torch.randn(F, D, device=DEV, requires_grad=True),
        shared_w_down=torch.randn(D, I, device=DEV, requires_grad=True),
    )
    counts = {}
    for backend in ("torch", "triton"):
        with FlopCounterMode(display=False) as mode:
            out, losses = fused_moe(*leaves, RouterConfig(top_k=K), backend=backend, **shared)
            (out.square().sum() + losses["aux_loss"]).backward()
        counts[backend] = mode.get_total_flops()
        if backend == "triton":
            seen = {str(op) for op in mode.get_flop_counts()["Global"]}
            assert {f"flashfusemoe.moe_{p}_{d}" for p in ("up", "down") for d in ("fwd", "bwd")} <= seen
    with FlopCounterMode(display=False) as mode:
        out, _ = fused_moe(
            *leaves, RouterConfig(top_k=K), backend="triton", recompute_activations=recompute, **shared
        )
        out.square().sum().backward()
    assert counts["triton"] == counts["torch"] > 0
    # with recompute each up projection runs again: the routed one on T*K rows, the shared one on T
    assert mode.get_total_flops() == counts["triton"] + (2 * (T * K + T) * F * D if recompute else 0)
