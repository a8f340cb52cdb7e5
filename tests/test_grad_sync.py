"""OverlappedGradSync and get_dense_params: on fake ranks and gloo processes the sync equals plain
backward plus a manual mean all-reduce (1 and several buckets, gradient accumulation), and EP = W with
the sync equals the unsharded step (integration/grad_sync_check.py holds the checks)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flashfusemoe import MoELayer, OverlappedGradSync, get_dense_params, get_expert_params
from flashfusemoe.comm import FakeWorld
from integration.grad_sync_check import TinyMoEModel, run_checks

SCRIPT = Path(__file__).resolve().parents[1] / "integration" / "grad_sync_check.py"


@given(st.integers(1, 4), st.sampled_from([1, 2, 5]), st.integers(0, 2**16))
def test_grad_sync_on_fake_ranks(world_size, buckets, seed):
    world = FakeWorld(world_size)

    def rank_fn(rank):
        def reduce_mean(t):
            parts = world.exchange(rank, [t.clone()] * world_size, "manual mean")
            return torch.stack(parts).sum(0) * (1.0 / world_size)

        run_checks(rank, world_size, world.group(rank), reduce_mean, buckets, seed=seed)

    world.run(rank_fn)


def _run_gloo_check(*args: str, interpret: bool = True) -> None:
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    world = args[args.index("--world") + 1]
    assert f"all {world} ranks OK" in proc.stdout


@pytest.mark.parametrize("world, buckets", [("2", "1"), ("3", "4"), ("4", "2")])
def test_grad_sync_over_gloo(world, buckets):
    _run_gloo_check("--world", world, "--buckets", buckets)


@pytest.mark.parametrize(
    "world, ep_size, backend", [("4", "2", "torch"), ("6", "3", "triton"), ("4", "1", "torch")]
)
def test_ep_inside_data_parallel_over_gloo(world, ep_size, backend):
    """EP groups of ep_size ranks, their replicas: dense sync over all, experts over the replicas
    divided by all ranks (``divide_by``): the unsharded step on the global batch."""
    _run_gloo_check("--world", world, "--ep-size", ep_size, "--backend", backend, "--buckets", "2")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("world", ["2", "4"])
def test_grad_sync_over_gloo_on_cuda(world, backend):
    """CUDA tensors, the ranks sharing one GPU (NCCL needs one GPU per rank)."""
    _run_gloo_check(
        "--world", world, "--buckets", "3", "--device", "cuda", "--backend", backend, interpret=False
    )


def test_dense_params_exclude_experts_and_come_in_backward_order():
    model = TinyMoEModel()
    dense = get_dense_params(model)
    experts = get_expert_params(model)
    assert [id(p) for p in experts] == [id(model.moe.w_up), id(model.moe.w_down)]
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in dense] == [
        "out.bias",
        "out.weight",
        "moe.shared_w_down",
        "moe.shared_w_up",
        "moe.gate_weight",
        "inp.bias",
        "inp.weight",
    ]
    assert get_dense_params(model, backward_order=False) == dense[::-1]
    model.inp.weight.requires_grad_(False)
    assert all(p is not model.inp.weight for p in get_dense_params(model))


def test_buckets_are_consecutive_balanced_and_one_dtype():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (4, 4, 4, 4)]
    params.insert(2, torch.nn.Parameter(torch.zeros(4, dtype=torch.float64)))
    sync = OverlappedGradSync(params, None, num_buckets=2)
    assert [[p.numel() for p in b] for b in sync.buckets] == [[4, 4], [4], [4, 4]]
    assert [b[0].dtype for b in sync.buckets] == [torch.float32, torch.float64, torch.float32]
    sync.remove()


def test_an_unused_parameter_counts_as_zeros_and_every_rank_gets_the_mean():
    world = FakeWorld(2)

    def rank_fn(rank):
        used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
        sync = OverlappedGradSync([used, unused], world.group(rank), num_buckets=1)
        (used * (rank + 1)).sum().backward()
        sync.finish()
        return used.grad, unused.grad

    for used, unused in world.run(rank_fn):
        assert torch.equal(used, torch.full((3,), 1.5)) and torch.equal(unused, torch.zeros(2))


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda m: dict(num_buckets=0), ValueError, r"num_buckets=0 must be an int in \[1, inf\]"),
        (lambda m: dict(num_buckets=True), TypeError, "num_buckets=True must be an int"),
        (lambda m: dict(dense_params=[m.inp.weight, m.inp.weight]), ValueError, "lists a parameter twice"),
        (lambda m: dict(expert_params=[m.inp.weight]), ValueError, "in both dense_params and expert_params"),
        (lambda m: dict(dense_params=[torch.zeros(3)]), TypeError, "dense_params must be parameters that"),
        (lambda m: dict(ep_group="world"), TypeError, "ep_group must be a torch.distributed ProcessGroup"),
        (lambda m: dict(divide_by=0), ValueError, r"divide_by=0 must be an int in \[1, inf\]"),
    ],
)
def test_grad_sync_argument_errors(make, exc, match):
    model = TinyMoEModel()
    kw = dict(dense_params=get_dense_params(model), ep_group=None) | make(model)
    with pytest.raises(exc, match=match):
        OverlappedGradSync(**kw)


def test_get_dense_params_finds_every_moe_layer():
    model = torch.nn.Sequential(MoELayer(4, 8, 2, 1), torch.nn.Linear(4, 4), MoELayer(4, 8, 2, 1))
    assert len(get_expert_params(model)) == 4 and len(get_dense_params(model)) == 4
