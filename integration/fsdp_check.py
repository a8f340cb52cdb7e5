"""MoELayer under PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``) over real processes (gloo on CPU).

``python integration/fsdp_check.py --world 2 [--backend triton]`` spawns W gloo processes; each checks,
on ``TinyMoEModel`` (linear -> MoELayer with a shared expert -> linear) against the same model unsharded
on the global batch (the mean of the ranks' equal-sized mean losses):
1. data parallel: built on the meta device, ``fully_shard`` on the MoE layer and on the root,
   ``to_empty`` + ``reset_parameters`` (the torchtitan way), then the reference's weights loaded with
   ``torch.distributed.checkpoint.state_dict.set_model_state_dict``: loss and every gradient equal, and
   after one AdamW step (on the sharded parameters) the next loss too;
2. gradient accumulation: two micro-batches, the first under ``set_requires_gradient_sync(False)``,
   equal the unsharded model's accumulated gradients;
3. EP = W beside FSDP2: experts sharded by ``shard_experts``, the dense parameters by ``fully_shard``
   with the experts as ``ignored_params``; FSDP2 averages the dense gradients, the expert gradients
   (each rank's experts, from every rank's tokens) are divided by W by hand (no aux loss: a batch's
   load-balance loss is not the mean of its parts'); equal to the unsharded step.
Exits non-zero on any mismatch.

Legend: W world size, T tokens per rank, D model dim, E experts.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: integration/ importable

from flashfusemoe import get_expert_params  # noqa: E402
from integration.grad_sync_check import TinyMoEModel, check_close, check_grads  # noqa: E402
from integration.ports import process_group, spawn_ranks  # noqa: E402


def run_checks(rank: int, world: int, backend: str | None = None, seed: int = 0) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    base = TinyMoEModel(E=2 * world, backend=backend)
    T = 6
    g = torch.Generator().manual_seed(seed + 1)
    xs = [[torch.randn(T, 8, generator=g) for _ in range(world)] for _ in range(2)]  # 2 micro-batches

    def global_loss(model, mb: int) -> torch.Tensor:
        return sum(model(x) for x in xs[mb]) / world

    def fsdp_model() -> TinyMoEModel:
        with torch.device("meta"):
            m = TinyMoEModel(E=2 * world, backend=backend)
        fully_shard(m.moe)
        fully_shard(m)
        m.to_empty(device="cpu")
        m.moe.reset_parameters()  # runs on the sharded (DTensor) parameters; overwritten below
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(m, base.state_dict(), options=full)
        return m

    # 1. data parallel: loss, gradients, and the loss after one AdamW step
    dp, ref = fsdp_model(), copy.deepcopy(base)
    loss = dp(xs[0][rank])
    loss.backward()
    ref_loss = global_loss(ref, 0)
    ref_loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    check_close("data parallel loss", mean_loss / world, ref_loss.detach())
    check_grads("data parallel", dp, ref)
    for m in (dp, ref):
        torch.optim.AdamW(m.parameters(), lr=1e-2).step()
    next_loss = dp(xs[1][rank]).detach()
    dist.all_reduce(next_loss)
    check_close("loss after a step", next_loss / world, global_loss(ref, 1).detach())

    # 2. gradient accumulation: no reduce-scatter after the first micro-batch
    acc, ref = fsdp_model(), copy.deepcopy(base)
    acc.set_requires_gradient_sync(False)
    acc(xs[0][rank]).backward()
    acc.set_requires_gradient_sync(True)
    acc(xs[1][rank]).backward()
    for mb in range(2):
        global_loss(ref, mb).backward()
    check_grads("accumulate", acc, ref)

    # 3. EP = W for the experts, FSDP2 for the dense parameters
    ref, ep = copy.deepcopy(base), copy.deepcopy(base)
    for m in (ref, ep):
        m.moe.aux_loss_coeff = 0.0
    ep.moe.shard_experts(None)
    experts = get_expert_params(ep)
    fully_shard(ep, ignored_params=set(experts))
    ep(xs[0][rank]).backward()
    for p in experts:
        p.grad.div_(world)
    global_loss(ref, 0).backward()
    e = ep.moe.w_up.shape[0]
    own = slice(rank * e, (rank + 1) * e)
    check_grads("EP=W + FSDP2", ep, ref, own)


def _worker(rank: int, args) -> None:
    with process_group("gloo", rank, args.world):
        run_checks(rank, args.world, args.backend, args.seed)
        print(f"rank {rank}/{args.world} (gloo, {args.backend}): OK", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--backend", default="torch")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    spawn_ranks(_worker, args, args.world, "fsdp_check")


if __name__ == "__main__":
    sys.exit(main())
