"""Expert-parallel equivalence check over real processes.

``python integration/ep_check.py --world 3 --pg gloo`` spawns W processes: gloo on CPU tensors, gloo
on CUDA tensors of one shared GPU (``--device cuda``: for correctness only, not for timing), or nccl
with one GPU per rank. Every rank builds the same global inputs from a seed and checks:
1. dispatch: its normal form (received slots as sorted (row, global expert, weight)) equals the
   loopback entries of its experts over all sources, bit for bit;
2. the layer: the EP-sharded layer on the rank's own tokens against the unsharded layer on all
   tokens, output and the gradients of x, router, w_up, w_down and shared experts (replicated ones
   summed over ranks). fp32: within 1e-5 of the largest reference value. bf16: the tolerance rule
   (error vs the fp32 reference at most twice the torch backend's own bf16 error, plus one bf16
   rounding of the largest reference value);
3. overlap: the sharded layer's overlapped schedule (shared experts beside the dispatch, on two CUDA
   streams for CUDA tensors) equals its serial schedule bit for bit.
Exits non-zero on any mismatch.

Legend: W world size, T tokens of a rank, D model dim, E experts, K top-k.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: integration/ importable

from flashfusemoe import MoELayer  # noqa: E402
from flashfusemoe.comm import NcclCommunicator, get_communicator  # noqa: E402
from flashfusemoe.comm.testing import expected_normal_form, normal_form  # noqa: E402
from integration.ports import process_group, spawn_ranks  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _tokens(args, rank: int) -> int:
    if args.empty_rank and rank == args.world - 1:
        return 0
    return args.tokens if args.same_tokens else args.tokens + 5 * rank


def _inputs(args, device):
    """Global inputs, identical on every rank: per-rank x and cotangents, and the fp32 reference layer."""
    g = torch.Generator().manual_seed(args.seed)
    xs = [torch.randn(_tokens(args, r), args.d_model, generator=g) for r in range(args.world)]
    gs = [torch.randn(x.shape, generator=g) for x in xs]
    torch.manual_seed(args.seed)
    layer = MoELayer(
        args.d_model, args.ffn_dim, args.experts, args.top_k, num_shared_experts=1, use_expert_bias=True
    )
    if args.skew:  # most tokens to experts 0 and 1: skewed, with empty experts
        layer.expert_bias[:2] = 10.0
    return [x.to(device) for x in xs], [g_.to(device) for g_ in gs], layer.to(device)


def _run(layer, x, cot, backend, compile_backend=None, overlap=True):
    """Output and every gradient of one forward+backward, as fp32; with ``compile_backend``, the
    layer under ``torch.compile`` (the communicator's dispatch and combine run eagerly, outside)."""
    layer = copy.deepcopy(layer)
    layer.backend, layer.overlap = backend, overlap
    x = x.detach().clone().requires_grad_()
    fwd = layer if compile_backend is None else torch.compile(layer, backend=compile_backend)
    out, _ = fwd(x)
    (out.float() * cot).sum().backward()
    named = {"out": out, "x.grad": x.grad}
    named.update({n + ".grad": p.grad for n, p in layer.named_parameters()})
    return {k: v.float() for k, v in named.items()}


def _worker(rank: int, args) -> None:
    if args.device == "cuda":  # nccl: a GPU per rank; gloo: every rank on GPU 0
        device = torch.device("cuda", rank if args.pg == "nccl" else 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    with process_group(args.pg, rank, args.world):
        comm = NcclCommunicator(sync_free=True) if args.sync_free else get_communicator(args.comm)
        xs, cotangents, ref32 = _inputs(args, device)
        dtype = DTYPES[args.dtype]
        E, K, W = args.experts, args.top_k, args.world

        # 1. Dispatch against the loopback normal form.
        g = torch.Generator().manual_seed(args.seed + 1)
        raw = [
            (
                x.to(dtype),
                torch.rand(x.shape[0], E, generator=g).topk(K, -1).indices.to(device),
                torch.rand(x.shape[0], K, generator=g).to(device),
            )
            for x in xs
        ]
        d = comm.dispatch(*raw[rank], num_experts=E)
        if normal_form(d, rank=rank, world_size=W, num_experts=E) != expected_normal_form(raw, rank, W, E):
            raise AssertionError("dispatch: normal form differs from loopback's")

        # 2. The layer, EP-sharded vs unsharded on the same global tokens.
        low = copy.deepcopy(ref32).to(dtype)
        cot_all = torch.cat(cotangents)
        ref = _run(ref32, torch.cat(xs), cot_all, "torch")
        torch_low = _run(low, torch.cat(xs).to(dtype), cot_all, "torch") if dtype != torch.float32 else None
        ep_layer = copy.deepcopy(low)
        ep_layer.shard_experts(None, communicator=comm)
        got = _run(ep_layer, xs[rank].to(dtype), cotangents[rank], args.backend, args.compile)
        serial = _run(ep_layer, xs[rank].to(dtype), cotangents[rank], args.backend, args.compile, False)
        for name, value in serial.items():  # before the all_reduces below change got's values
            if not torch.equal(value, got[name]):
                raise AssertionError(f"rank {rank}: {name} of the overlapped schedule differs from serial")
        lo = sum(x.shape[0] for x in xs[:rank])
        hi = lo + xs[rank].shape[0]
        e = E // W
        errs, failures = {}, []
        for name, want in ref.items():  # every rank runs every all_reduce before anyone raises
            sel = {
                "out": slice(lo, hi),
                "x.grad": slice(lo, hi),
                "w_up.grad": slice(rank * e, (rank + 1) * e),
                "w_down.grad": slice(rank * e, (rank + 1) * e),
            }.get(name)
            value = got[name]
            if sel is None:  # replicated: this rank's share, summed over ranks
                dist.all_reduce(value)
            else:
                want = want[sel]
            err = (value - want).abs().max().item() if want.numel() else 0.0
            scale = want.abs().max().item() if want.numel() else 0.0
            if torch_low is None:
                bound = 1e-5 * max(1.0, scale)
            else:
                own = torch_low[name] if sel is None else torch_low[name][sel]
                torch_err = (own - want).abs().max().item() if want.numel() else 0.0
                bound = 2 * torch_err + 2.0**-8 * scale
            if not err <= bound:
                failures.append(f"{name}: max error {err:.3e} > bound {bound:.3e}")
            errs[name] = err
        if failures:
            raise AssertionError(f"rank {rank}: " + "; ".join(failures))
        print(
            f"rank {rank}/{W} ({args.pg}, {args.device}, {args.dtype}, {type(comm).__name__}"
            f"{' sync-free' if args.sync_free else ''}{' compiled' if args.compile else ''}, "
            f"T={xs[rank].shape[0]}): OK " + " ".join(f"{k}={v:.1e}" for k, v in errs.items()),
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2, help="processes (EP world size)")
    p.add_argument("--pg", choices=["gloo", "nccl"], default="gloo", help="torch.distributed backend")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda for nccl, else cpu")
    p.add_argument("--comm", default="nccl", help="communicator name or module:Class (nccl runs on gloo too)")
    p.add_argument("--sync-free", action="store_true", help="the nccl communicator without host syncs")
    p.add_argument(
        "--same-tokens", action="store_true", help="every rank has --tokens (implied by sync-free)"
    )
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--tokens", type=int, default=7, help="tokens of rank 0 (rank r has 5r more)")
    p.add_argument("--d-model", type=int, default=12)
    p.add_argument("--ffn-dim", type=int, default=10)
    p.add_argument("--experts", type=int, default=6)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skew", action="store_true", help="route most tokens to two experts (others empty)")
    p.add_argument("--empty-rank", action="store_true", help="the last rank has no tokens")
    p.add_argument("--backend", default="torch", help="compute backend of the sharded layer")
    p.add_argument("--compile", default=None, help="run the sharded layer under torch.compile(backend=...)")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if args.pg == "nccl" else "cpu")
    args.same_tokens = args.same_tokens or args.sync_free
    if args.world < 1 or args.tokens < 0:
        p.error("--world must be >= 1 and --tokens >= 0")
    spawn_ranks(_worker, args, args.world, "ep_check")


if __name__ == "__main__":
    sys.exit(main())
