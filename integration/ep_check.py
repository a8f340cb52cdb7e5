"""Expert-parallel equivalence check over real processes.

``python integration/ep_check.py --world 3 --pg gloo`` spawns W processes (gloo on CPU, or nccl with one
GPU per rank). Every rank builds the same global inputs from a seed, runs the unsharded layer on all
tokens and the EP-sharded layer (``shard_experts``) on its own, and checks: dispatch equals the loopback
specification in canonical row order (bit-exact), and the layer's output and the gradients of x, router,
w_up, w_down and shared experts equal the unsharded run. Exits non-zero on any mismatch.

Legend: W world size, T tokens of a rank, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flashfusemoe import MoELayer
from flashfusemoe.comm import get_communicator
from flashfusemoe.comm.loopback import LoopbackCommunicator


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tokens(args, rank: int) -> int:
    return 0 if (args.empty_rank and rank == args.world - 1) else args.tokens + 5 * rank


def _inputs(args, device):
    """Global inputs, identical on every rank: per-rank x and cotangents, and the reference layer."""
    g = torch.Generator().manual_seed(args.seed)
    xs = [torch.randn(_tokens(args, r), args.d_model, generator=g) for r in range(args.world)]
    gs = [torch.randn(x.shape, generator=g) for x in xs]
    torch.manual_seed(args.seed)
    layer = MoELayer(
        args.d_model, args.ffn_dim, args.experts, args.top_k, num_shared_experts=1, use_expert_bias=args.skew
    )
    if args.skew:  # route most tokens to experts 0 and 1: skewed, with empty experts
        layer.expert_bias[:2] = 10.0
    return [x.to(device) for x in xs], [g_.to(device) for g_ in gs], layer.to(device)


def _check(name: str, got: torch.Tensor, ref: torch.Tensor, exact: bool = False) -> float:
    if got.shape != ref.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
    if got.numel() == 0:
        return 0.0
    err = (got.float() - ref.float()).abs().max().item()
    if (exact and not torch.equal(got, ref)) or err > 1e-4 * (1 + ref.abs().max().item()):
        raise AssertionError(f"{name}: max error {err:.3e}{' (must be bit-exact)' if exact else ''}")
    return err


def _worker(rank: int, args, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device(f"cuda:{rank}") if args.pg == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.pg, rank=rank, world_size=args.world)
    try:
        xs, cotangents, ref_layer = _inputs(args, device)
        comm = get_communicator(args.comm, group=None)

        # Dispatch vs the loopback specification, canonical order (expert, source, token).
        E, K = args.experts, args.top_k
        g = torch.Generator().manual_seed(args.seed + 1)
        ids = [torch.rand(x.shape[0], E, generator=g).topk(K, -1).indices.to(device) for x in xs]
        d = comm.dispatch(xs[rank], ids[rank], num_experts=E)
        loop = [LoopbackCommunicator().dispatch(x, i, num_experts=E) for x, i in zip(xs, ids, strict=True)]
        e = E // args.world
        expected = []
        for expert in range(rank * e, (rank + 1) * e):
            for src in loop:
                start = int(src.recv_counts_e[:expert].sum())
                expected.append(src.recv_x_RD[start : start + int(src.recv_counts_e[expert])])
        _check("dispatch rows", d.recv_x_RD, torch.cat(expected), exact=True)

        # Full layer: EP-sharded vs unsharded on the same global tokens.
        ref_x = [x.clone().requires_grad_() for x in xs]
        ref_out, _ = ref_layer(torch.cat(ref_x))
        (ref_out * torch.cat(cotangents)).sum().backward()
        ep_layer = copy.deepcopy(ref_layer)
        ep_layer.zero_grad(set_to_none=True)
        ep_layer.shard_experts(None, communicator=args.comm)
        ep_layer.backend = args.backend
        x = xs[rank].clone().requires_grad_()
        out, _ = ep_layer(x)
        (out * cotangents[rank]).sum().backward()
        offsets = [0]
        for t in xs:
            offsets.append(offsets[-1] + t.shape[0])
        errs = {
            "out": _check("out", out, ref_out[offsets[rank] : offsets[rank + 1]]),
            "x.grad": _check("x.grad", x.grad, ref_x[rank].grad),
        }
        lo, hi = rank * e, (rank + 1) * e
        errs["w_up.grad"] = _check("w_up.grad", ep_layer.w_up.grad, ref_layer.w_up.grad[lo:hi])
        errs["w_down.grad"] = _check("w_down.grad", ep_layer.w_down.grad, ref_layer.w_down.grad[lo:hi])
        for name in ("gate_weight", "shared_w_up", "shared_w_down"):  # replicated: sum of the ranks' shares
            grad = getattr(ep_layer, name).grad.clone()
            dist.all_reduce(grad)
            errs[name + ".grad"] = _check(name, grad, getattr(ref_layer, name).grad)
        print(
            f"rank {rank}/{args.world} ({args.pg}, T={x.shape[0]}): OK "
            + " ".join(f"{k}={v:.1e}" for k, v in errs.items()),
            flush=True,
        )
        dist.barrier()  # nobody tears down while a peer still talks (gloo aborts a rank that sees that)
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--pg", choices=["gloo", "nccl"], default="gloo")
    p.add_argument(
        "--comm", default="nccl", help="communicator name (the nccl communicator runs on gloo too)"
    )
    p.add_argument("--tokens", type=int, default=7)
    p.add_argument("--d-model", type=int, default=12)
    p.add_argument("--ffn-dim", type=int, default=10)
    p.add_argument("--experts", type=int, default=6)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skew", action="store_true", help="route most tokens to two experts")
    p.add_argument("--empty-rank", action="store_true", help="the last rank has no tokens")
    p.add_argument("--backend", default="torch", help="compute backend of the sharded layer")
    args = p.parse_args(argv)
    mp.spawn(_worker, args=(args, _free_port()), nprocs=args.world, join=True)
    print(f"ep_check: all {args.world} ranks OK")


if __name__ == "__main__":
    sys.exit(main())
