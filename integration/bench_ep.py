"""Expert-parallel benchmark: what a dispatch sends, what a dispatch+combine costs the host, and the
layer at EP = 1 through each communicator against the single-GPU (loopback) layer, same run.

``python integration/bench_ep.py [--parts bytes,host,layer] [--write docs/benchmarks_ep.md]``

- ``bytes`` (any machine): bytes one rank's dispatch sends to the other ranks for the fine-grained
  shape at W = 2, 4, 8, computed from its routing: one row per kept slot (the transport before the
  per-(token, rank) packing), one row per (token, destination rank) (``nccl``, ``fake``), and
  sync-free (every token to every rank).
- ``host`` (GPU): host milliseconds of one ``nccl`` dispatch+combine over real NCCL with one rank (the
  bookkeeping, the async split copy and its one host wait, two NCCL launches), against loopback.
- ``layer`` (GPU): forward+backward of the layer through ``nccl`` (W = 1, default and sync-free)
  against ``loopback``, eager and graphed, same inputs, interleaved rounds.
Timings of ranks sharing a GPU are not EP timings; multi-GPU runs belong to their own issue.

Legend: T tokens, D model dim, I expert intermediate dim, E experts, K top-k, W EP world size.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist

from flashfusemoe import RouterConfig, fused_moe
from flashfusemoe.backends.torch import route, router_logits
from flashfusemoe.comm import LoopbackCommunicator, NcclCommunicator
from flashfusemoe.comm.alltoall import dispatch_bytes
from integration.bench_layer import SHAPES, emit, make_inputs, time_variant


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
        sync_free = (W - 1) * T * pair_row
        rows.append(
            dict(
                shape=shape_name,
                W=W,
                per_slot_MB=per_slot / 1e6,
                per_pair_MB=per_pair / 1e6,
                sync_free_MB=sync_free / 1e6,
            )
        )
    return rows


def _init_single_rank_nccl() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))


def host_rows(shape_name: str = "fine", iters: int = 30) -> list[dict]:
    T, D, I, E, K = SHAPES[shape_name]
    x = torch.randn(T, D, device="cuda").bfloat16()
    ids = torch.rand(T, E, device="cuda").topk(K, -1).indices.int()
    w = torch.rand(T, K, device="cuda")
    rows = []
    for name, comm in (
        ("loopback", LoopbackCommunicator()),
        ("nccl W=1", NcclCommunicator()),
        ("nccl W=1 sync-free", NcclCommunicator(sync_free=True)),
    ):
        host, total = [], []
        for i in range(iters + 3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            d = comm.dispatch(x, ids, w, num_experts=E)
            comm.combine(d.recv_x_RD, d.handle)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            if i >= 3:
                host.append((t1 - t0) * 1e3)
                total.append((t2 - t0) * 1e3)
        rows.append(
            dict(
                shape=shape_name,
                communicator=name,
                host_ms=statistics.median(host),
                total_ms=statistics.median(total),
            )
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _layer_fn(K: int, comm):
    return lambda x, gate, up, down, bias: fused_moe(
        x, gate, up, down, RouterConfig(top_k=K), expert_bias=bias, backend="triton", communicator=comm
    )[0]


def layer_rows(shapes=("seed", "fine"), rounds: int = 3) -> list[dict]:
    rows = []
    comms = {
        "loopback": None,
        "nccl W=1": NcclCommunicator(),
        "nccl W=1 sync-free": NcclCommunicator(sync_free=True),
    }
    for shape_name in shapes:
        T, D, I, E, K = SHAPES[shape_name]
        inputs = make_inputs(SHAPES[shape_name], skew=False)
        grad_out = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        fns = {name: _layer_fn(K, comm) for name, comm in comms.items()}
        times = {n: [] for n in fns}
        graphable = {n: n != "nccl W=1" for n in fns}  # a host sync cannot be captured
        for _ in range(rounds):
            for name, fn in fns.items():
                try:
                    times[name].append(time_variant(fn, inputs, grad_out, graph=graphable[name]))
                except RuntimeError as exc:  # a transport that refuses capture: eager numbers only
                    print(f"{name}: no CUDA graph ({exc})", flush=True)
                    graphable[name] = False
                    times[name].append(time_variant(fn, inputs, grad_out, graph=False))
        for name in fns:
            _, total, graph, _ = (statistics.median(c) for c in zip(*times[name], strict=True))
            rows.append(dict(shape=shape_name, communicator=name, total_ms=total, graph_ms=graph))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def render(card: str, parts: dict) -> str:
    lines = [f"# Expert parallelism benchmarks ({card})", ""]
    if "bytes" in parts:
        lines += [
            "## Bytes one dispatch sends to other ranks (rank 0, fine-grained shape, balanced routing)",
            "",
            "Computed from the routing of `integration/bench_ep.py`: per kept slot (D bf16 + an fp32 weight"
            " per row: the transport before this redesign), per (token, destination rank) (D bf16 + K int32"
            " ids + K fp32 weights per row: `nccl`, `fake`), and sync-free (every token to every rank).",
            "",
            "| W | per slot MB | per (token, rank) MB | ratio | sync-free MB | sync-free / per (token, rank) "
            "|",
            "|---|---|---|---|---|---|",
        ]
        for r in parts["bytes"]:
            lines.append(
                f"| {r['W']} | {r['per_slot_MB']:.1f} | {r['per_pair_MB']:.1f} | "
                f"{r['per_pair_MB'] / r['per_slot_MB']:.2f} | {r['sync_free_MB']:.1f} | "
                f"{r['sync_free_MB'] / r['per_pair_MB']:.2f} |"
            )
        lines.append("")
    if "host" in parts:
        lines += [
            "## One dispatch+combine, fine-grained shape, W = 1 over real NCCL (ms, median of 30)",
            "",
            "`host` = until both calls return (the bookkeeping, launches and the one wait for the split"
            " sizes); `total` = until the GPU is done.",
            "",
            "| communicator | host ms | total ms |",
            "|---|---|---|",
        ]
        lines += [
            f"| {r['communicator']} | {r['host_ms']:.3f} | {r['total_ms']:.3f} |" for r in parts["host"]
        ]
        lines.append("")
    if "layer" in parts:
        lines += [
            "## The layer at EP = 1 through each communicator (forward+backward ms, same run)",
            "",
            "| shape | communicator | eager ms | graphed ms | eager vs loopback |",
            "|---|---|---|---|---|",
        ]
        for r in parts["layer"]:
            b = next(
                x for x in parts["layer"] if x["shape"] == r["shape"] and x["communicator"] == "loopback"
            )
            graph = "n/a (host sync)" if r["graph_ms"] != r["graph_ms"] else f"{r['graph_ms']:.2f}"
            lines.append(
                f"| {r['shape']} | {r['communicator']} | {r['total_ms']:.2f} | {graph} | "
                f"{r['total_ms'] / b['total_ms']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="bytes,host,layer")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--write", default=None, help="write the markdown tables to this file")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    wanted = args.parts.split(",")
    gpu = torch.cuda.is_available()
    parts = {"bytes": bytes_rows()} if "bytes" in wanted else {}
    if gpu and {"host", "layer"} & set(wanted):
        _init_single_rank_nccl()
        if "host" in wanted:
            parts["host"] = host_rows()
        if "layer" in wanted:
            parts["layer"] = layer_rows(rounds=args.rounds)
        dist.destroy_process_group()
    elif not gpu:
        print("no GPU: the host and layer parts need one (and NCCL); bytes only")
    emit(
        render(torch.cuda.get_device_name() if gpu else "computed on CPU", parts),
        parts,
        args.write,
        args.json,
    )


if __name__ == "__main__":
    main()
