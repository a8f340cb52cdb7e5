"""Expert-parallel benchmark: what a dispatch sends, dispatch+combine bandwidth per communicator, and
the EP layer per GPU, each against a baseline measured in the same run.

    python -m integration.bench_ep [--parts bytes,comm,layer]           # one GPU: EP = 1 (+ bytes)
    torchrun --nproc_per_node=W -m integration.bench_ep --comms nccl,deepep   # EP = W, a GPU per rank
    python -m integration.bench_ep --smoke W                            # W gloo ranks sharing one GPU

- ``bytes`` (any machine): bytes one rank's dispatch sends to other ranks, fine-grained shape,
  W = 2, 4, 8, from its routing: per kept slot, per (token, destination rank) (``nccl``), sync-free.
- ``comm`` (W > 1): dispatch+combine of each communicator in GB/s of token bytes that cross ranks
  (rows to and from other ranks x D bf16, both directions), against ``all_to_all_single`` of a plain
  bf16 buffer with the same splits, same run; T = 1024..16384 tokens per rank, D = 2048 and 7168,
  K = 4 and 8, E = 64, balanced routing. Per GPU: the slowest rank's median.
- ``layer``: the EP layer (triton, bf16, one shared expert) forward+backward per GPU at EP = W with
  the shape's T tokens on every rank, seed-like and fine-grained shapes, overlap on/off, latent
  ``D/2`` on/off. At EP = 1 (one process): loopback (the single-GPU layer) against ``nccl`` and
  ``deepep`` (a group of one rank: loopback's path), the all-to-all bookkeeping alone
  (``comm.testing.SelfAllToAll``: what every all-to-all rank pays on top of the wire), and latent's cost.

``--smoke W`` runs the same code with W gloo processes on one GPU: it checks that the multi-rank
paths run end to end; its timings are not EP timings (ranks share one GPU, gloo goes through the
host). The multi-GPU numbers and their targets belong to the multi-GPU issue: run the torchrun line.

Legend: T tokens per rank, D model dim, I expert intermediate dim, E experts, K top-k, W EP size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flashfusemoe import MoELayer, RouterConfig
from flashfusemoe.backends.torch import route, router_logits
from flashfusemoe.comm import get_communicator
from flashfusemoe.comm.alltoall import dispatch_bytes
from flashfusemoe.comm.testing import SelfAllToAll
from integration.bench_layer import SHAPES, emit, timed
from integration.ports import free_port

COMM_TOKENS, COMM_DIMS, COMM_TOPK, COMM_EXPERTS = (1024, 2048, 4096, 8192, 16384), (2048, 7168), (4, 8), 64


def bytes_rows(shape_name: str = "fine", worlds=(2, 4, 8)) -> list[dict]:
    T, D, I, E, K = SHAPES[shape_name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g).bfloat16()
    gate = (torch.randn(E, D, generator=g) * D**-0.5).bfloat16()
    ids = route(router_logits(x, gate), RouterConfig(top_k=K)).topk_ids_TK
    slot_row, pair_row = D * 2 + 4, D * 2 + K * 4 + K * 4  # x + fp32 weight; x + int32 ids + fp32 weights
    rows = []
    for W in worlds:
        per_slot = dispatch_bytes(ids, E, W, slot_row, rank=0, per_slot=True)
        per_pair = dispatch_bytes(ids, E, W, pair_row, rank=0)
        rows.append(
            dict(
                shape=shape_name,
                W=W,
                per_slot_MB=per_slot / 1e6,
                per_pair_MB=per_pair / 1e6,
                sync_free_MB=(W - 1) * T * pair_row / 1e6,
            )
        )
    return rows


def _slowest(ms: float) -> float:
    """The slowest rank's time: what a step of W ranks waits for."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ms
    t = torch.tensor([ms], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _splits(ids_TK: torch.Tensor, W: int, e: int) -> tuple[list[int], list[int]]:
    """Rows per destination rank (one per token and rank it goes to) and rows from each source."""
    goes_TW = torch.zeros(ids_TK.shape[0], W, dtype=torch.bool, device=ids_TK.device)
    goes_TW.scatter_(1, ids_TK // e, True)
    send = goes_TW.sum(0).to(torch.int64)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)
    return send.tolist(), recv.tolist()


def _comm_case(comms: dict, rank: int, W: int, T: int, D: int, K: int, iters: int) -> list[dict]:
    """One (T, D, K) point: every communicator and the plain all-to-all, same inputs."""
    E, e = COMM_EXPERTS, COMM_EXPERTS // W
    g = torch.Generator(device="cuda").manual_seed(rank * 7919 + T + D + K)
    x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
    ids = torch.rand(T, E, device="cuda", generator=g).topk(K, -1).indices
    w = torch.rand(T, K, device="cuda", generator=g)
    send, recv = _splits(ids, W, e)
    crossing = (sum(send) - send[rank] + sum(recv) - recv[rank]) * D * 2
    plain_send = torch.empty(sum(send), D, device="cuda", dtype=torch.bfloat16)
    plain_recv = torch.empty(sum(recv), D, device="cuda", dtype=torch.bfloat16)

    def plain():
        dist.all_to_all_single(plain_recv, plain_send, recv, send)
        dist.all_to_all_single(plain_send, plain_recv, send, recv)

    def step(comm):
        d = comm.dispatch(x, ids, w, num_experts=E)
        comm.combine(d.recv_x_RD, d.handle)

    times = {"all_to_all_single": _slowest(timed(plain, iters))}
    for name, comm in comms.items():
        times[name] = _slowest(timed(lambda c=comm: step(c), iters))
    base = times["all_to_all_single"]
    return [
        dict(W=W, D=D, K=K, T=T, communicator=n, ms=ms, GBps=crossing / ms / 1e6, vs_plain=base / ms)
        for n, ms in times.items()
    ]


def comm_rows(comms: dict, rank: int, W: int, tokens, dims, topks, iters: int) -> list[dict]:
    rows = []
    for D in dims:
        for K in topks:
            for T in tokens:
                rows += _comm_case(comms, rank, W, T, D, K, iters)
                if rank == 0:
                    print("\n".join(json.dumps(r) for r in rows[-len(comms) - 1 :]), flush=True)
    return rows


def _layer(shape, latent: bool, overlap: bool, comm) -> MoELayer:
    T, D, I, E, K = shape
    torch.manual_seed(0)
    layer = MoELayer(
        D, 2 * I, E, K, num_shared_experts=1, latent_dim=D // 2 if latent else None, overlap=overlap,
        backend="triton", device="cuda", dtype=torch.bfloat16,
    )  # fmt: skip
    if comm is not None:
        layer.shard_experts(getattr(comm, "group", None), communicator=comm)
    return layer


def _layer_ms(layer: MoELayer, T: int, rank: int, iters: int) -> float:
    g = torch.Generator(device="cuda").manual_seed(rank)
    x = torch.randn(T, layer.d_model, device="cuda", generator=g).bfloat16().requires_grad_()
    grad_out = torch.randn_like(x)
    params = [x, *layer.parameters()]

    def fwd_bwd():
        for p in params:
            p.grad = None
        layer(x)[0].backward(grad_out)

    return _slowest(timed(fwd_bwd, iters))


def layer_variants(W: int, comms: dict) -> list[tuple[str, bool, bool, object]]:
    """(communicator label, latent, overlap, communicator or None for loopback) to time at EP = W."""
    if W == 1:
        out = [("loopback", False, False, None), ("loopback", True, False, None)]
        out += [(f"{n} (group of 1)", False, False, c) for n, c in comms.items()]
        out += [("all-to-all bookkeeping (SelfAllToAll)", False, False, SelfAllToAll())]
        return out
    return [(n, lat, ov, c) for n, c in comms.items() for lat in (False, True) for ov in (True, False)]


def layer_rows(comms: dict, rank: int, W: int, shapes, tokens: int | None, rounds: int, iters: int):
    rows = []
    for shape_name in shapes:
        T, D, I, E, K = SHAPES[shape_name]
        shape = (tokens or T, D, I, E, K)
        variants = layer_variants(W, comms)
        times = [[] for _ in variants]
        for r in range(rounds):  # interleaved rounds, each starting one variant later: drift and
            for j in range(len(variants)):  # position effects spread over every variant alike
                i = (j + r) % len(variants)
                _, latent, overlap, comm = variants[i]
                layer = _layer(shape, latent, overlap, comm)
                times[i].append(_layer_ms(layer, shape[0], rank, iters))
                del layer
        for (name, latent, overlap, _), ts in zip(variants, times, strict=True):
            rows.append(
                dict(
                    shape=shape_name, T=shape[0], W=W, communicator=name, latent=latent,
                    overlap=overlap, ms=statistics.median(ts),
                )
            )  # fmt: skip
            if rank == 0:
                print(json.dumps(rows[-1]), flush=True)
    return rows


def _communicators(names: list[str]) -> dict:
    out = {}
    for name in names:
        try:
            out[name] = get_communicator(name, None)
        except ImportError as exc:  # deep_ep not installed: say so, time the others
            print(f"skipping {name}: {exc}", flush=True)
    return out


def run_parts(rank: int, W: int, args) -> dict:
    """The GPU parts on this rank (torch.distributed initialized with W ranks)."""
    wanted = args.parts.split(",")
    comms = _communicators(args.comms.split(","))
    parts = {}
    if "comm" in wanted:
        if W > 1:
            parts["comm"] = comm_rows(
                comms, rank, W, args.comm_tokens, args.comm_dims, args.comm_topk, args.iters
            )
        elif rank == 0:
            print("comm: no bytes cross ranks at W = 1; run it under torchrun (or --smoke W)", flush=True)
    if "layer" in wanted:
        parts["layer"] = layer_rows(
            comms, rank, W, args.shapes.split(","), args.layer_tokens, args.rounds, args.iters
        )
    return parts


def _init(rank: int, W: int, backend: str, port: int | None) -> None:
    if port is not None:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    kw = {"device_id": torch.device("cuda", torch.cuda.current_device())} if backend == "nccl" else {}
    dist.init_process_group(backend, rank=rank, world_size=W, **kw)


def _smoke_worker(rank: int, args, port: int) -> None:
    torch.cuda.set_device(0)
    _init(rank, args.smoke, "gloo", port)
    try:
        parts = run_parts(rank, args.smoke, args)
        if rank == 0:
            _emit(args, parts, label=f"SMOKE: {args.smoke} gloo ranks sharing one GPU, not EP timings")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def render(card: str, label: str, parts: dict) -> str:
    lines = [f"# Expert parallelism benchmarks ({card})", "", f"Run: {label}.", ""]
    if "bytes" in parts:
        lines += [
            "## Bytes one dispatch sends to other ranks (rank 0, fine-grained shape, balanced routing)",
            "",
            "Per kept slot (D bf16 + an fp32 weight a row), per (token, destination rank) (D bf16 + K int32"
            " ids + K fp32 weights a row: `nccl`), sync-free (every token to every rank).",
            "",
            "| W | per slot MB | per (token, rank) MB | ratio | sync-free MB | sync-free / per pair |",
            "|---|---|---|---|---|---|",
        ]
        for r in parts["bytes"]:
            lines.append(
                f"| {r['W']} | {r['per_slot_MB']:.1f} | {r['per_pair_MB']:.1f} | "
                f"{r['per_pair_MB'] / r['per_slot_MB']:.2f} | {r['sync_free_MB']:.1f} | "
                f"{r['sync_free_MB'] / r['per_pair_MB']:.2f} |"
            )
        lines.append("")
    if "comm" in parts:
        lines += [
            "## dispatch+combine vs all_to_all_single of the same bytes (slowest rank's median)",
            "",
            "GB/s of token bytes that cross ranks (rows to and from other ranks x D bf16). E = 64, balanced.",
            "",
            "| W | D | K | T per rank | communicator | ms | GB/s | vs plain |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['W']} | {r['D']} | {r['K']} | {r['T']} | {r['communicator']} | {r['ms']:.3f} | "
            f"{r['GBps']:.1f} | {r['vs_plain']:.2f} |"
            for r in parts["comm"]
        ]
        lines.append("")
    if "layer" in parts:
        lines += [
            "## EP layer forward+backward per GPU (triton, bf16, 1 shared expert; slowest rank's median)",
            "",
            "| shape | T per rank | W | communicator | latent D/2 | overlap | ms | vs first row |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in parts["layer"]:
            base = next(x for x in parts["layer"] if x["shape"] == r["shape"])
            latent, overlap = "yes" if r["latent"] else "no", "on" if r["overlap"] else "off"
            lines.append(
                f"| {r['shape']} | {r['T']} | {r['W']} | {r['communicator']} | {latent} | {overlap} | "
                f"{r['ms']:.2f} | {r['ms'] / base['ms']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def _emit(args, parts: dict, label: str) -> None:
    if "bytes" in args.parts.split(","):
        parts = {"bytes": bytes_rows(), **parts}
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "computed on CPU"
    emit(render(card, label, parts), parts, args.write, args.json)


def main(argv: list[str] | None = None) -> None:
    ints = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="bytes,comm,layer")
    p.add_argument("--comms", default="nccl,deepep", help="communicators to time (deepep: bf16, CUDA)")
    p.add_argument("--shapes", default="seed,fine", help="bench_layer.py shapes for the layer part")
    p.add_argument("--layer-tokens", type=int, default=None, help="tokens per rank (default: the shape's)")
    p.add_argument("--comm-tokens", type=ints, default=COMM_TOKENS)
    p.add_argument("--comm-dims", type=ints, default=COMM_DIMS)
    p.add_argument("--comm-topk", type=ints, default=COMM_TOPK)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--smoke", type=int, default=0, help="W gloo ranks sharing GPU 0 (a smoke check)")
    p.add_argument("--write", default=None, help="write the markdown tables to this file")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    gpu_parts = {"comm", "layer"} & set(args.parts.split(","))
    if not torch.cuda.is_available() or not gpu_parts:
        if gpu_parts:
            print("no GPU: the comm and layer parts need one; bytes only", flush=True)
        _emit(args, {}, label="computed from the routing")
        return
    if args.smoke:
        mp.spawn(_smoke_worker, args=(args, free_port()), nprocs=args.smoke, join=True)
        return
    W, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    _init(rank, W, "nccl", free_port() if W == 1 else None)
    try:
        parts = run_parts(rank, W, args)
        if rank == 0:
            label = "one process (EP = 1)" if W == 1 else f"torchrun, {W} ranks, one GPU each, NCCL"
            _emit(args, parts, label)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
