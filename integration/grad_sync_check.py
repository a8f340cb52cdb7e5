"""OverlappedGradSync checks over real processes (gloo on CPU), and the checks themselves, which
tests/test_grad_sync.py also runs on ``fake`` ranks.

``python integration/grad_sync_check.py --world 3 [--buckets 4] [--backend torch]`` spawns W gloo
processes; each checks, on a small model (linear -> MoELayer with a shared expert -> linear):
1. sync: backward with the hooks + ``finish()`` equals plain backward + a manual mean all-reduce per
   dense parameter; expert gradients are not touched;
2. accumulation: two micro-batches, the first under ``no_sync()``, equal plain accumulation + the
   manual all-reduce;
3. EP = W: the sharded model with the sync (expert gradients scaled by 1/W) equals the unsharded
   model's step on the global batch, whose loss is the mean of the ranks' equal-sized mean losses.
``--ep-size W_ep`` (dividing W) checks instead EP inside data parallelism (gloo only: it needs
subgroups): EP groups of W_ep consecutive ranks, their W / W_ep replicas; a dense sync over every rank
and an expert sync over the ranks holding the same experts, divided by W (``divide_by``), equal the
unsharded model's step on the global batch.
Exits non-zero on any mismatch.

Legend: W world size, T tokens per rank, D model dim, E experts.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: integration/ importable

from flashfusemoe import MoELayer, OverlappedGradSync, get_dense_params, get_expert_params  # noqa: E402
from integration.ports import process_group, spawn_ranks  # noqa: E402


class TinyMoEModel(nn.Module):
    """linear -> MoE (with a shared expert) -> linear, so that dense parameters sit on both sides."""

    def __init__(self, D: int = 8, E: int = 4, K: int = 2, backend: str | None = None) -> None:
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe = MoELayer(D, 2 * D, E, K, num_shared_experts=1, aux_loss_coeff=0.1, backend=backend)
        self.out = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, losses = self.moe(self.inp(x))
        return self.out(y).square().mean() + losses["aux_loss"]


_EXPERTS = ("moe.w_up", "moe.w_down")  # the parameters sharded by EP


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_close(name: str, got: torch.Tensor | None, want: torch.Tensor) -> None:
    """``got`` (a DTensor, as FSDP2's gradients are, as its whole tensor) equals ``want`` up to fp32
    rounding; an AssertionError naming ``name`` otherwise (or when there is no gradient)."""
    if got is None:
        raise AssertionError(f"{name}: no gradient")
    got = got.full_tensor() if hasattr(got, "full_tensor") else got
    if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
        raise AssertionError(f"{name}: max error {(got - want).abs().max().item():.3e}")


def check_grads(what: str, model: nn.Module, ref: nn.Module, own: slice | None = None) -> None:
    """Every gradient of ``model`` against ``ref``'s; of the EP-sharded experts, the rows ``own`` this
    rank holds."""
    want = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        g = want[n].grad
        check_close(f"{what} {n}", p.grad, g[own] if own is not None and n in _EXPERTS else g)


def run_checks(
    rank: int,
    world: int,
    group: object | None,
    reduce_mean: Callable[[torch.Tensor], torch.Tensor],
    buckets: int,
    backend: str | None = None,
    seed: int = 0,
    device: str = "cpu",
) -> None:
    """The three checks on rank ``rank``; ``reduce_mean`` averages a tensor over the ranks (the manual
    all-reduce the sync must equal). Every rank draws the same model and the global batch."""
    torch.manual_seed(seed)
    base = TinyMoEModel(E=2 * world, backend=backend).to(device)
    T = 6
    g = torch.Generator().manual_seed(seed + 1)
    # 2 micro-batches of the global batch
    xs = [[torch.randn(T, 8, generator=g).to(device) for _ in range(world)] for _ in range(2)]

    def sharded() -> TinyMoEModel:
        m = copy.deepcopy(base)
        m.moe.shard_experts(group)
        return m

    # 1. one step: hooks + finish() vs plain backward + manual mean
    synced, plain = sharded(), sharded()
    sync = OverlappedGradSync(get_dense_params(synced), group, num_buckets=buckets)
    synced(xs[0][rank]).backward()
    sync.finish()
    plain(xs[0][rank]).backward()
    dense = {id(p) for p in get_dense_params(plain)}
    want = {n: reduce_mean(p.grad) if id(p) in dense else p.grad for n, p in plain.named_parameters()}
    for n, got in _grads(synced).items():
        check_close(f"sync {n}", got, want[n])

    # 2. gradient accumulation: no_sync on the first micro-batch
    acc, plain_acc = sharded(), sharded()
    sync_acc = OverlappedGradSync(get_dense_params(acc), group, num_buckets=buckets)
    with sync_acc.no_sync():
        acc(xs[0][rank]).backward()
    acc(xs[1][rank]).backward()
    sync_acc.finish()
    for mb in range(2):
        plain_acc(xs[mb][rank]).backward()
    dense = {id(p) for p in get_dense_params(plain_acc)}
    for n, p in plain_acc.named_parameters():
        check_close(
            f"accumulate {n}",
            dict(acc.named_parameters())[n].grad,
            reduce_mean(p.grad) if id(p) in dense else p.grad,
        )

    # 3. EP = W with the sync and expert scaling vs the unsharded step on the global batch (no aux
    # loss: a batch's load-balance loss is not the mean of its parts')
    ref, ep = copy.deepcopy(base), sharded()
    for m in (ref, ep):
        m.moe.aux_loss_coeff = 0.0
    sync_ep = OverlappedGradSync(
        get_dense_params(ep), group, num_buckets=buckets, expert_params=get_expert_params(ep)
    )
    ep(xs[0][rank]).backward()
    sync_ep.finish()
    (sum(ref(x) for x in xs[0]) / world).backward()
    e = ep.moe.w_up.shape[0]
    check_grads("EP=W", ep, ref, slice(rank * e, (rank + 1) * e))


def run_ep_dp_check(rank: int, world: int, ep_size: int, buckets: int, backend: str, seed: int) -> None:
    """EP groups of ``ep_size`` consecutive ranks inside data parallelism (gloo processes, CPU)."""
    ep_groups = [dist.new_group(list(range(g, g + ep_size))) for g in range(0, world, ep_size)]
    replica_groups = [dist.new_group(list(range(i, world, ep_size))) for i in range(ep_size)]
    torch.manual_seed(seed)
    base = TinyMoEModel(E=2 * ep_size, backend=backend)
    base.moe.aux_loss_coeff = 0.0  # a batch's load-balance loss is not the mean of its parts'
    g = torch.Generator().manual_seed(seed + 1)
    xs = [torch.randn(6, 8, generator=g) for _ in range(world)]
    ref, ep = copy.deepcopy(base), copy.deepcopy(base)
    (sum(ref(x) for x in xs) / world).backward()
    ep.moe.shard_experts(ep_groups[rank // ep_size])
    dense = OverlappedGradSync(get_dense_params(ep), None, num_buckets=buckets)
    experts = OverlappedGradSync(get_expert_params(ep), replica_groups[rank % ep_size], 1, divide_by=world)
    ep(xs[rank]).backward()
    dense.finish()
    experts.finish()
    e = ep.moe.w_up.shape[0]
    own = slice(rank % ep_size * e, (rank % ep_size + 1) * e)
    check_grads(f"EP={ep_size} x DP={world // ep_size}", ep, ref, own)


def _reduce_mean(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def _worker(rank: int, args) -> None:
    with process_group("gloo", rank, args.world):
        if args.ep_size:
            run_ep_dp_check(rank, args.world, args.ep_size, args.buckets, args.backend, args.seed)
        else:
            run_checks(
                rank, args.world, None, _reduce_mean, args.buckets, args.backend, args.seed, args.device
            )
        print(f"rank {rank}/{args.world} (gloo, {args.device}, {args.buckets} buckets): OK", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--buckets", type=int, default=4)
    p.add_argument("--backend", default="torch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: the ranks share one GPU")
    p.add_argument(
        "--ep-size", type=int, default=None, help="EP groups of this size inside data parallelism (CPU)"
    )
    args = p.parse_args(argv)
    if args.ep_size is not None and (args.ep_size < 1 or args.world % args.ep_size or args.device != "cpu"):
        p.error(f"--ep-size {args.ep_size} must divide --world {args.world} (CPU)")
    spawn_ranks(_worker, args, args.world, "grad_sync_check")


if __name__ == "__main__":
    sys.exit(main())
