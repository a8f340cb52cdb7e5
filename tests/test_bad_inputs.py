"""Bad input, table-driven: every case raises the expected error type with a message that names the
argument (and what was expected), and leaves every tensor it was given as it was."""

from __future__ import annotations

import pytest
import torch

from flashfusemoe import MoELayer, RouterConfig, fused_moe, update_expert_bias
from flashfusemoe.comm import (
    FakeCommunicator,
    FakeWorld,
    LoopbackCommunicator,
    NcclCommunicator,
    get_communicator,
    register_communicator,
)

NAN, INF = float("nan"), float("inf")


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype).to(device)


def fused(**over):
    """fused_moe on T=3, D=8, E=4, I=6 (swiglu) with ``over`` replacing arguments."""
    args = dict(x=_t(3, 8), gate=_t(4, 8), w_up=_t(4, 12, 8), w_down=_t(4, 8, 6)) | over
    x, gate, w_up, w_down = (args.pop(k) for k in ("x", "gate", "w_up", "w_down"))
    tensors = [v for v in (x, gate, w_up, w_down, *args.values()) if isinstance(v, torch.Tensor)]
    return (lambda: fused_moe(x, gate, w_up, w_down, **args)), tensors


def layer(**kw):
    args = dict(d_model=8, ffn_dim=12, num_experts=4) | kw
    return (lambda: MoELayer(**args)), []


def forward(x, **kw):
    built = MoELayer(8, 12, 4, **kw)
    return (lambda: built(x)), [x] if isinstance(x, torch.Tensor) else []


def router(**kw):
    return (lambda: RouterConfig(**kw)), []


def shard(group_of, communicator=None, experts=4, twice=False):
    world = FakeWorld(2)
    built = MoELayer(8, 12, experts, 1)
    if twice:
        built.shard_experts(world.group(0))
    return (lambda: built.shard_experts(group_of(world), communicator)), []


def dispatch(x=None, ids=None, w=None, E=2):
    x = _t(1, 3) if x is None else x
    ids = torch.tensor([[0, 1]]) if ids is None else ids
    w = torch.rand(1, 2) if w is None else w
    tensors = [t for t in (x, ids, w) if isinstance(t, torch.Tensor)]
    return (lambda: LoopbackCommunicator().dispatch(x, ids, w, num_experts=E)), tensors


def combine_wrong_rows():
    comm = LoopbackCommunicator()
    d = comm.dispatch(_t(2, 3), torch.tensor([[0], [1]]), torch.ones(2, 1), num_experts=2)
    y = _t(3, 3)
    return (lambda: comm.combine(y, d.handle)), [y]


def bias_update(bias=None, counts=None, rate=1e-3):
    bias = torch.zeros(4) if bias is None else bias
    counts = torch.tensor([4, 1, 2, 1]) if counts is None else counts
    tensors = [t for t in (bias, counts) if isinstance(t, torch.Tensor)]
    return (lambda: update_expert_bias(bias, counts, rate)), tensors


def layer_bias_update(counts, use_expert_bias=True):
    built = MoELayer(8, 12, 4, use_expert_bias=use_expert_bias)
    return (lambda: built.update_expert_bias(counts)), []


def call(fn):
    return fn, []


CASES = [
    # fused_moe: tensors
    ("x 3-D", lambda: fused(x=_t(3, 4, 5)), ValueError, r"hidden_states must have shape \[T, D\]"),
    ("x int", lambda: fused(x=torch.ones(3, 8, dtype=torch.long)), TypeError, "hidden_states must be one of"),
    ("x list", lambda: fused(x=[[0.0] * 8]), TypeError, "hidden_states must be a torch.Tensor"),
    ("gate shape", lambda: fused(gate=_t(4, 7)), ValueError, r"gate_weight must have shape \[E, D=8\]"),
    (
        "gate int",
        lambda: fused(gate=torch.ones(4, 8, dtype=torch.int32)),
        TypeError,
        "gate_weight must be a floating",
    ),
    (
        "gate bool",
        lambda: fused(gate=torch.ones(4, 8, dtype=torch.bool)),
        TypeError,
        "gate_weight must be a floating",
    ),
    (
        "gate meta",
        lambda: fused(gate=_t(4, 8, device="meta")),
        ValueError,
        "gate_weight is on meta, hidden_states on cpu",
    ),
    (
        "w_up odd",
        lambda: fused(w_up=_t(4, 9, 8)),
        ValueError,
        "w_up has 9 rows; activation='swiglu' needs an even",
    ),
    ("w_up D", lambda: fused(w_up=_t(4, 12, 7)), ValueError, r"w_up must have shape \[E, 2I, D=8\]"),
    (
        "w_down shape",
        lambda: fused(w_down=_t(4, 8, 5)),
        ValueError,
        r"w_down must have shape \[E=4, D=8, I=6\]",
    ),
    (
        "w_up experts",
        lambda: fused(w_up=_t(3, 12, 8), w_down=_t(3, 8, 6)),
        ValueError,
        "w_up holds 3 experts",
    ),
    (
        "w_down f64",
        lambda: fused(w_down=_t(4, 8, 6, dtype=torch.float64)),
        TypeError,
        "w_down dtype torch.float64",
    ),
    ("w_up meta", lambda: fused(w_up=_t(4, 12, 8, device="meta")), ValueError, "w_up is on meta"),
    ("w_up list", lambda: fused(w_up=[1.0]), ValueError, "w_up must be a 3-D tensor"),
    ("activation", lambda: fused(activation="tanh"), ValueError, "activation='tanh' is not supported"),
    ("activation int", lambda: fused(activation=3), ValueError, "activation=3 is not supported"),
    (
        "bias shape",
        lambda: fused(expert_bias=torch.zeros(5)),
        ValueError,
        r"expert_bias must have shape \[E=4\]",
    ),
    (
        "bias int",
        lambda: fused(expert_bias=torch.zeros(4, dtype=torch.long)),
        TypeError,
        "expert_bias must be a floating",
    ),
    (
        "bias meta",
        lambda: fused(expert_bias=torch.zeros(4, device="meta")),
        ValueError,
        "expert_bias is on meta",
    ),
    (
        "shared alone",
        lambda: fused(shared_w_up=_t(12, 8)),
        ValueError,
        "shared_w_up and shared_w_down must be given",
    ),
    (
        "shared D",
        lambda: fused(shared_w_up=_t(12, 7), shared_w_down=_t(8, 6)),
        ValueError,
        r"shared_w_up must have shape",
    ),
    (
        "shared 3-D",
        lambda: fused(shared_w_up=_t(1, 12, 8), shared_w_down=_t(8, 6)),
        ValueError,
        "shared_w_up must be a 2-D",
    ),
    # fused_moe: scalars, router, backend, communicator
    (
        "router dict",
        lambda: fused(router=dict(top_k=2)),
        TypeError,
        "router must be a RouterConfig, got dict",
    ),
    (
        "top_k > E",
        lambda: fused(router=RouterConfig(top_k=5)),
        ValueError,
        r"top_k=5 must be an int in \[1, num_experts=4\]",
    ),
    (
        "groups divisor",
        lambda: fused(router=RouterConfig(num_groups=3, topk_groups=1)),
        ValueError,
        "num_groups=3 must be a positive divisor",
    ),
    (
        "top_k > groups",
        lambda: fused(router=RouterConfig(3, num_groups=2, topk_groups=1)),
        ValueError,
        "top_k=3 exceeds the experts",
    ),
    (
        "aux str",
        lambda: fused(aux_loss_coeff="0.1"),
        TypeError,
        "aux_loss_coeff='0.1' must be a finite number",
    ),
    ("aux nan", lambda: fused(aux_loss_coeff=NAN), ValueError, "aux_loss_coeff=nan must be a finite number"),
    ("z inf", lambda: fused(z_loss_coeff=INF), ValueError, "z_loss_coeff=inf must be a finite number"),
    ("z bool", lambda: fused(z_loss_coeff=True), TypeError, "z_loss_coeff=True must be a finite number"),
    (
        "recompute int",
        lambda: fused(recompute_activations=1),
        TypeError,
        "recompute_activations=1 must be a bool, 'routed' or 'shared', got int",
    ),
    (
        "recompute name",
        lambda: fused(recompute_activations="experts"),
        ValueError,
        "recompute_activations='experts' must be a bool, 'routed' or 'shared'",
    ),
    ("overlap int", lambda: fused(overlap=1), TypeError, "overlap=1 must be a bool"),
    (
        "backend name",
        lambda: fused(backend="cuda-magic"),
        ValueError,
        r"backend='cuda-magic' is unknown; available: \['torch'",
    ),
    ("backend int", lambda: fused(backend=3), TypeError, "backend=3 must be a str or None"),
    (
        "communicator str",
        lambda: fused(communicator="fake"),
        TypeError,
        "communicator must be a Communicator or None, got str",
    ),
    # RouterConfig
    ("top_k 0", lambda: router(top_k=0), ValueError, r"top_k=0 must be an int in \[1, inf\]"),
    ("top_k bool", lambda: router(top_k=True), TypeError, "top_k=True must be an int"),
    ("top_k float", lambda: router(top_k=2.0), TypeError, "top_k=2.0 must be an int"),
    (
        "score_func",
        lambda: router(score_func="sparsemax"),
        ValueError,
        "score_func='sparsemax' is not supported",
    ),
    ("renormalize str", lambda: router(renormalize="yes"), TypeError, "renormalize='yes' must be a bool"),
    (
        "groups alone",
        lambda: router(num_groups=2),
        ValueError,
        "num_groups and topk_groups must be given together",
    ),
    (
        "topk_groups > G",
        lambda: router(num_groups=2, topk_groups=3),
        ValueError,
        r"topk_groups=3 must be an int in \[1, num_groups=2\]",
    ),
    (
        "num_groups bool",
        lambda: router(num_groups=True, topk_groups=1),
        TypeError,
        "num_groups=True must be an int",
    ),
    (
        "scaling str",
        lambda: router(routed_scaling_factor="2"),
        TypeError,
        "routed_scaling_factor='2' must be a finite",
    ),
    (
        "scaling nan",
        lambda: router(routed_scaling_factor=NAN),
        ValueError,
        "routed_scaling_factor=nan must be a finite",
    ),
    (
        "capacity inf",
        lambda: router(capacity_factor=INF),
        ValueError,
        "capacity_factor=inf must be a finite number > 0",
    ),
    (
        "capacity 0",
        lambda: router(capacity_factor=0.0),
        ValueError,
        "capacity_factor=0.0 must be a finite number > 0",
    ),
    (
        "capacity str",
        lambda: router(capacity_factor="1"),
        TypeError,
        "capacity_factor='1' must be a finite number",
    ),
    # MoELayer construction
    ("d_model 0", lambda: layer(d_model=0), ValueError, r"d_model=0 must be an int in \[1, inf\]"),
    ("d_model bool", lambda: layer(d_model=True), TypeError, "d_model=True must be an int"),
    ("experts float", lambda: layer(num_experts=2.5), TypeError, "num_experts=2.5 must be an int"),
    ("ffn odd", lambda: layer(ffn_dim=7), ValueError, "ffn_dim=7 must be even"),
    (
        "shared -1",
        lambda: layer(num_shared_experts=-1),
        ValueError,
        r"num_shared_experts=-1 must be an int in \[0, inf\]",
    ),
    (
        "top_k vs router",
        lambda: layer(top_k=3, router=RouterConfig(top_k=2)),
        ValueError,
        "top_k=3 disagrees with router.top_k=2",
    ),
    ("router int", lambda: layer(router=2), TypeError, "router must be a RouterConfig or None, got int"),
    ("layer backend", lambda: layer(backend="garbage"), ValueError, "backend='garbage' is unknown"),
    (
        "layer aux None",
        lambda: layer(aux_loss_coeff=None),
        TypeError,
        "aux_loss_coeff=None must be a finite number",
    ),
    (
        "layer seq aux None",
        lambda: layer(seq_aux_loss_coeff=None),
        TypeError,
        "seq_aux_loss_coeff=None must be a finite number",
    ),
    (
        "layer aux group",
        lambda: forward(_t(3, 8), aux_loss_coeff=0.1, aux_loss_group="dp"),
        TypeError,
        "aux_loss_group must be a torch.distributed ProcessGroup, a FakeGroup or None, got str",
    ),
    (
        "layer seq loss with capacity",
        lambda: forward(_t(2, 3, 8), seq_aux_loss_coeff=0.1, router=RouterConfig(capacity_factor=1.0)),
        ValueError,
        "seq_aux_loss_coeff=0.1 needs dropless routing",
    ),
    (
        "layer bias flag",
        lambda: layer(use_expert_bias="no"),
        TypeError,
        "use_expert_bias='no' must be a bool",
    ),
    (
        "layer recompute",
        lambda: layer(recompute_activations=None),
        TypeError,
        "recompute_activations=None must be a bool",
    ),
    (
        "layer recompute name",
        lambda: layer(recompute_activations="all"),
        ValueError,
        "recompute_activations='all' must be a bool, 'routed' or 'shared'",
    ),
    ("layer overlap", lambda: layer(overlap="yes"), TypeError, "overlap='yes' must be a bool"),
    ("activation layer", lambda: layer(activation="tanh"), ValueError, "activation='tanh' is not supported"),
    (
        "latent >= D",
        lambda: layer(latent_dim=8),
        ValueError,
        r"latent_dim=8 must be an int in \[1, d_model - 1=7\]",
    ),
    ("latent float", lambda: layer(latent_dim=4.0), TypeError, "latent_dim=4.0 must be an int"),
    (
        "latent alone",
        lambda: fused(latent_down=_t(4, 8)),
        ValueError,
        "latent_down and latent_up must be given together",
    ),
    (
        "latent shapes",
        lambda: fused(latent_down=_t(4, 8), latent_up=_t(8, 3), w_up=_t(4, 12, 4), w_down=_t(4, 4, 6)),
        ValueError,
        r"latent_down must be \[L, D=8\] and latent_up \[D=8, L\]",
    ),
    (
        "experts not latent",
        lambda: fused(latent_down=_t(4, 8), latent_up=_t(8, 4)),
        ValueError,
        r"w_up must have shape \[E, 2I, D=4\]",
    ),
    # MoELayer forward
    ("x last dim", lambda: forward(_t(3, 5)), ValueError, r"x must have shape \[..., D=8\]"),
    ("x not tensor", lambda: forward([1.0] * 8), TypeError, "x must be a torch.Tensor, got list"),
    (
        "x meta",
        lambda: forward(_t(3, 8, device="meta")),
        ValueError,
        "gate_weight is on cpu, hidden_states on meta",
    ),
    (
        "layer meta",
        lambda: forward(_t(3, 8), device="meta"),
        ValueError,
        "gate_weight is on meta, hidden_states on cpu",
    ),
    # shard_experts
    (
        "group str",
        lambda: shard(lambda w: "not a group"),
        TypeError,
        "ep_group must be a torch.distributed ProcessGroup",
    ),
    (
        "loopback on 2",
        lambda: shard(lambda w: w.group(0), "loopback"),
        ValueError,
        "LoopbackCommunicator spans 1 rank",
    ),
    (
        "E % W",
        lambda: shard(lambda w: w.group(0), experts=3),
        ValueError,
        "num_experts=3 is not divisible by the EP world size 2",
    ),
    (
        "twice",
        lambda: shard(lambda w: w.group(0), twice=True),
        RuntimeError,
        "shard_experts was already called",
    ),
    (
        "comm int",
        lambda: shard(lambda w: w.group(0), 3),
        TypeError,
        "communicator must be a name, a Communicator or None",
    ),
    # the registry
    (
        "register int",
        lambda: call(lambda: register_communicator(3, LoopbackCommunicator)),
        ValueError,
        "communicator name 3 must be a non-empty str",
    ),
    (
        "register factory",
        lambda: call(lambda: register_communicator("x", "nope")),
        TypeError,
        "factory must be callable",
    ),
    (
        "unknown comm",
        lambda: call(lambda: get_communicator("carrier-pigeon")),
        ValueError,
        "communicator 'carrier-pigeon' is unknown",
    ),
    (
        "module:Class",
        lambda: call(lambda: get_communicator("no_mod_xyz:X")),
        ValueError,
        "communicator 'no_mod_xyz:X' cannot be loaded",
    ),
    (
        "comm type",
        lambda: call(lambda: get_communicator(3)),
        TypeError,
        "communicator must be a name, a Communicator or None, got int",
    ),
    # communicators
    (
        "ids float",
        lambda: dispatch(ids=torch.tensor([[0.0, 1.0]])),
        TypeError,
        "topk_ids must be int32 or int64",
    ),
    ("ids list", lambda: dispatch(ids=[[0, 1]]), TypeError, "topk_ids must be a torch.Tensor"),
    (
        "weights shape",
        lambda: dispatch(w=torch.rand(1, 3)),
        ValueError,
        r"topk_weights must be a tensor of topk_ids' shape \(1, 2\)",
    ),
    (
        "weights int",
        lambda: dispatch(w=torch.ones(1, 2, dtype=torch.long)),
        TypeError,
        "topk_weights must be a floating tensor",
    ),
    ("ids device", lambda: dispatch(x=_t(1, 3, device="meta")), ValueError, "topk_ids is on cpu, x on meta"),
    ("num_experts", lambda: dispatch(E=0), ValueError, "num_experts=0 must be a positive int"),
    ("combine rows", combine_wrong_rows, ValueError, r"y must have shape \[R=2, D\]"),
    (
        "fake rank",
        lambda: call(lambda: FakeWorld(2).group(2)),
        ValueError,
        r"rank=2 must be an int in \[0, world_size=2\)",
    ),
    ("fake world", lambda: call(lambda: FakeWorld(0)), ValueError, "world_size=0 must be an int >= 1"),
    (
        "fake outside run",
        lambda: call(
            lambda: FakeCommunicator(FakeWorld(1).group(0)).dispatch(
                _t(1, 3), torch.tensor([[0]]), torch.ones(1, 1), num_experts=1
            )
        ),
        RuntimeError,
        "outside FakeWorld.run",
    ),
    (
        "fake sync_free",
        lambda: call(lambda: FakeCommunicator(FakeWorld(1).group(0), sync_free="yes")),
        TypeError,
        "sync_free must be a bool",
    ),
    (
        "nccl no dist",
        lambda: call(NcclCommunicator),
        RuntimeError,
        "communicator 'nccl' needs torch.distributed initialized",
    ),
    # update_expert_bias
    ("rate nan", lambda: bias_update(rate=NAN), ValueError, "rate=nan must be a finite number"),
    ("rate str", lambda: bias_update(rate="big"), TypeError, "rate='big' must be a finite number"),
    (
        "counts shape",
        lambda: bias_update(counts=torch.ones(5)),
        ValueError,
        r"tokens_per_expert shape \(5,\) must match",
    ),
    (
        "bias long",
        lambda: bias_update(bias=torch.zeros(4, dtype=torch.long)),
        TypeError,
        "expert_bias must be a floating tensor",
    ),
    (
        "counts bool",
        lambda: bias_update(counts=torch.ones(4, dtype=torch.bool)),
        TypeError,
        "tokens_per_expert must hold counts",
    ),
    (
        "layer no bias",
        lambda: layer_bias_update(torch.ones(4), use_expert_bias=False),
        RuntimeError,
        "use_expert_bias=False",
    ),
    (
        "layer counts list",
        lambda: layer_bias_update([1, 2, 3, 4]),
        TypeError,
        "tokens_per_expert must be a tensor",
    ),
]


@pytest.mark.parametrize("make, exc, match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error_and_changes_nothing(make, exc, match):
    thunk, tensors = make()
    before = [t.clone() if t.device.type != "meta" else t for t in tensors]
    with pytest.raises(exc, match=match):
        thunk()
    for t, t0 in zip(tensors, before, strict=True):
        assert t.device.type == "meta" or torch.equal(t, t0)


def test_the_table_has_forty_distinct_cases():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)
