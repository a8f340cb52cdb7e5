"""QuACK's grouped GEMMs against ours, op by op, per kernel configuration (a GPU with QuACK installed).

The six expert ops of a SwiGLU layer (up + gather + SwiGLU; down; the activation backward with its GEMM
and gather; both weight gradients; the x-gradient rows), each timed on our path (the triton backend's
kernels and ``torch._grouped_mm``, the gathers included where QuACK folds them) and on QuACK's with each
configuration named by ``--cfgs`` (``_CFG_NAME``), beside a dense cuBLAS GEMM of the same FLOPs;
QuACK's outputs checked against ours. What chose ``backends/triton/quack_gemm.py``'s configurations
(docs/kernels.md).

    python integration/quack_sweep.py [--shapes fine,sonic] [--cfgs pp128x192c21,...]
                                                       # compile (parallel workers), then time and check
    python integration/quack_sweep.py worker KIND CFG  # one compile (internal)

Legend: T tokens, D model dim, I intermediate dim, E experts, K top-k, N = T*K rows.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory

SHAPES = {
    "seed": (8192, 1024, 2048, 8, 2),
    "fine": (16384, 2048, 768, 128, 8),
    "olmoe": (16384, 2048, 1024, 64, 8),
    "mixtral": (8192, 4096, 14336, 8, 2),
    "sonic": (32768, 4096, 1024, 128, 8),
}
KINDS = ["up", "down", "dact", "dw_down", "dx", "dw_up"]
PLAIN = ["down", "dx"]  # no rows read through an index: the only ops a cluster along N may run
OUTPUTS = dict(  # what each op writes, checked against ours
    up=["h", "a"], down=["y"], dact=["dh", "wa", "ds"], dw_down=["dw_down"], dx=["dx"], dw_up=["dw_up"]
)
# A configuration by name: (pp ping-pong | co cooperative) <tile_m> x <tile_n> c <cluster_m><cluster_n>,
# then optionally s<k> (QuACK's max_swizzle_size, default 8) and d (its dynamic persistent scheduler)
_CFG_NAME = re.compile(r"(pp|co)(\d+)x(\d+)c([12])([12])(?:s(\d+))?(d?)")
DEFAULT_SHAPES = ["seed", "fine", "olmoe", "mixtral"]
DEFAULT_CFGS = ["pp128x192c21", "pp128x128c21", "co256x128c21", "co256x192c21"]


def parse_cfg(name: str) -> dict | None:
    """The ``GemmConfig`` fields of configuration ``name`` (see ``_CFG_NAME``), or None if malformed."""
    m = _CFG_NAME.fullmatch(name)
    if m is None:
        return None
    kind, tm, tn, cm, cn, swizzle, dynamic = m.groups()
    return dict(
        tile_m=int(tm), tile_n=int(tn), pingpong=kind == "pp", cluster_m=int(cm), cluster_n=int(cn),
        max_swizzle_size=int(swizzle or 8), is_dynamic_persistent=bool(dynamic),
    )  # fmt: skip


def kinds_for(name: str) -> list[str]:
    """The ops config ``name`` can run: QuACK reads rows through an index only with cluster_n = 1."""
    return KINDS if parse_cfg(name)["cluster_n"] == 1 else PLAIN


def cfg(name):
    from quack.gemm_config import GemmConfig

    return GemmConfig(**parse_cfg(name), device_capacity=9)


def inputs(shape, seed=0):
    from flashfusemoe.backends.triton.metadata import routing_metadata

    T, D, I, E, K = shape
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(T, D, device=dev, dtype=bf, generator=g)
    w_up = torch.randn(E, 2 * I, D, device=dev, dtype=bf, generator=g) / D**0.5
    w_down = torch.randn(E, D, I, device=dev, dtype=bf, generator=g) / I**0.5
    ids = torch.rand(T, E, device=dev, generator=g).topk(K, dim=1).indices.int()
    wts = torch.rand(T, K, device=dev, generator=g).float()
    gout = torch.randn(T, D, device=dev, dtype=bf, generator=g)
    meta = routing_metadata(ids, E, T * K, row_tokens=True)
    cu, a_idx = meta.bounds_E1, meta.row_token_M
    s_rows = wts.reshape(-1)[meta.row_slot_M.long()].contiguous()
    return dict(
        x=x,
        w_up=w_up,
        w_down=w_down,
        ids=ids,
        wts=wts,
        gout=gout,
        meta=meta,
        cu=cu,
        a_idx=a_idx,
        s_rows=s_rows,
        shape=shape,
    )


def quack_ops(d, name):
    """KIND -> a zero-arg callable running QuACK's version with config ``name``, and its outputs dict."""
    from quack.gemm_interface import gemm_dgated_tuned, gemm_gated_tuned, gemm_tuned

    T, D, I, E, K = d["shape"]
    N = T * K
    c = cfg(name)
    x, w_up, w_down, cu, a_idx = d["x"], d["w_up"], d["w_down"], d["cu"], d["a_idx"]
    r = lambda *s: torch.randn(*s, device=x.device, dtype=x.dtype)  # noqa: E731  (any kind runs alone)
    o = dict(
        h=r(N, 2 * I),
        a=r(N, I),
        y=x.new_empty(N, D),
        dh=r(N, 2 * I),
        wa=r(N, I),
        dx=x.new_empty(N, D),
        dw_down=torch.empty_like(w_down),
        dw_up=torch.empty_like(w_up),
        ds=None,
    )

    def up():
        gemm_gated_tuned.fn(
            x,
            w_up.transpose(1, 2),
            o["h"],
            o["a"],
            activation="swiglu",
            cu_seqlens_m=cu,
            A_idx=a_idx,
            dynamic_scheduler=False,
            config=c,
            concat_layout=("B",),
        )

    def down():
        gemm_tuned.fn(
            o["a"], w_down.transpose(1, 2), o["y"], cu_seqlens_m=cu, dynamic_scheduler=False, config=c
        )

    def dact():
        o["ds"] = gemm_dgated_tuned.fn(
            d["gout"],
            w_down,
            o["h"],
            o["dh"],
            o["wa"],
            colvec_scale=d["s_rows"],
            activation="swiglu",
            colvec_reduce=True,
            cu_seqlens_m=cu,
            A_idx=a_idx,
            dynamic_scheduler=False,
            config=c,
        )

    def dw_down():
        gemm_tuned.fn(
            d["gout"].T,
            o["wa"],
            o["dw_down"],
            cu_seqlens_k=cu,
            A_idx=a_idx,
            dynamic_scheduler=False,
            config=c,
        )

    def dx():
        gemm_tuned.fn(
            o["dh"], w_up, o["dx"], cu_seqlens_m=cu, dynamic_scheduler=False, config=c, concat_layout=("B",)
        )

    def dw_up():
        gemm_tuned.fn(
            x.T,
            o["dh"],
            o["dw_up"].transpose(1, 2),
            cu_seqlens_k=cu,
            A_idx=a_idx,
            dynamic_scheduler=False,
            config=c,
            concat_layout=("out",),
        )

    return dict(up=up, down=down, dact=dact, dw_down=dw_down, dx=dx, dw_up=dw_up), o


def our_ops(d):
    from flashfusemoe.backends.triton.activation import activation_backward
    from flashfusemoe.backends.triton.grouped_gemm import grouped_mm, grouped_mm_act, grouped_mm_wgrad
    from flashfusemoe.backends.triton.permute import gather_rows

    T, D, I, E, K = d["shape"]
    m = d["meta"]
    x, w_up, w_down = d["x"], d["w_up"], d["w_down"]
    o = {}

    def up():
        o["h"], o["a"] = grouped_mm_act(x, w_up.transpose(1, 2), m.offs_E, "swiglu", gather=(m.row_slot_M, K))

    def down():
        o["y"] = grouped_mm(o["a"], w_down.transpose(1, 2), m.offs_E)

    def dact():
        o["gy"] = gather_rows(d["gout"], m.row_slot_M, m.live, K)
        ga = grouped_mm(o["gy"], w_down, m.offs_E)
        o["dh"], o["wa"], o["ds_slot"] = activation_backward(
            o["h"], ga, "swiglu", m.live, d["wts"].reshape(-1), m.row_slot_M, False
        )

    def dw_down():
        o["dw_down"] = grouped_mm_wgrad(o["gy"], o["wa"], m.offs_E)

    def dx():
        o["dx"] = grouped_mm(o["dh"], w_up, m.offs_E)

    def dw_up():
        xg = gather_rows(x, m.row_slot_M, m.live, K)
        o["dw_up"] = grouped_mm_wgrad(o["dh"], xg, m.offs_E)

    return dict(up=up, down=down, dact=dact, dw_down=dw_down, dx=dx, dw_up=dw_up), o


def inter(t):  # [g | u] columns -> [g0, u0, g1, u1, ...]
    n = t.shape[-1] // 2
    return t.unflatten(-1, (2, n)).transpose(-1, -2).flatten(-2)


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def dense_ms(M, K, N) -> float:
    """Median ms of a dense bf16 ``[M, K] @ [K, N]`` (cuBLAS)."""
    a = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(K, N, device="cuda", dtype=torch.bfloat16)
    return triton.testing.do_bench(lambda: a @ b, warmup=10, rep=60, return_mode="median")


def worker(kind, name):
    d = inputs(SHAPES["seed"])
    ops, _ = quack_ops(d, name)
    t0 = time.time()
    ops[kind]()
    torch.cuda.synchronize()
    print(json.dumps(dict(kind=kind, cfg=name, s=time.time() - t0)), flush=True)


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help=f"of {list(SHAPES)}")
    p.add_argument("--cfgs", default=",".join(DEFAULT_CFGS), help="names as pp128x192c21[s4][d]")
    args = p.parse_args(argv)
    shapes, cfgs = args.shapes.split(","), args.cfgs.split(",")
    unknown = [n for n in shapes if n not in SHAPES]
    if unknown:
        p.error(f"--shapes: unknown {unknown}; known: {list(SHAPES)}")
    unknown = [n for n in cfgs if parse_cfg(n) is None]
    if unknown:
        p.error(f"--cfgs: unknown {unknown}; names as pp128x192c21, co256x128c12s4 or pp128x192c21d")
    out = os.environ.get("OUT", "/tmp")
    t0 = time.time()
    jobs = [(k, n) for n in cfgs for k in kinds_for(n)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "worker", k, n],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k, n in jobs
    ]
    compile_s = {}
    for (k, n), p in zip(jobs, procs, strict=True):
        so, se = p.communicate()
        if p.returncode:
            print(f"compile {k} {n} FAILED:\n{se[-3000:]}", flush=True)
        else:
            compile_s[f"{k}/{n}"] = json.loads(so.strip().splitlines()[-1])["s"]
    print(f"parallel compile wall {time.time() - t0:.1f} s; per job {compile_s}", flush=True)
    rows = []
    for sname in shapes:
        shape = SHAPES[sname]
        d = inputs(shape)
        ours, oo = our_ops(d)
        tq = {}
        for k in KINDS:
            ours[k]()
        torch.cuda.synchronize()
        t_ours = {k: triton.testing.do_bench(ours[k], warmup=10, rep=60, return_mode="median") for k in KINDS}
        T, D, I, E, K = shape
        N = T * K
        dims = dict(
            up=(N, D, 2 * I),
            down=(N, I, D),
            dact=(N, D, I),
            dw_down=(D, N, I),
            dx=(N, 2 * I, D),
            dw_up=(2 * I, N, D),
        )  # (M, K, N) of the dense GEMM with the op's FLOPs
        t_dense = {k: dense_ms(*mkn) for k, mkn in dims.items()}
        rows.append(dict(shape=sname, cfg="dense", ms=t_dense))
        for n in cfgs:
            try:
                kinds = kinds_for(n)
                qops, qo = quack_ops(d, n)
                if "up" not in kinds:  # the plain GEMMs alone: they read our path's a and dh
                    qo["a"].copy_(oo["a"])
                    qo["dh"].copy_(inter(oo["dh"]))
                t1 = time.time()
                for k in kinds:
                    qops[k]()
                torch.cuda.synchronize()
                first = time.time() - t1
                m = d["meta"]
                ds_slot = torch.zeros_like(oo["ds_slot"])
                if qo["ds"] is not None:
                    ds_slot[m.row_slot_M.long()] = qo["ds"]
                ref = dict(oo, h=inter(oo["h"]), dh=inter(oo["dh"]), ds=oo["ds_slot"])
                got = dict(qo, ds=ds_slot)
                errs = {o: rel(got[o], ref[o]) for k in kinds for o in OUTPUTS[k]}
                tq[n] = {
                    k: triton.testing.do_bench(qops[k], warmup=10, rep=60, return_mode="median")
                    for k in kinds
                }
                rows.append(dict(shape=sname, cfg=n, first_s=first, errs=errs, ms=tq[n]))
                print(
                    f"{sname} {n}: first {first:.1f}s errs "
                    + " ".join(f"{k}={v:.1e}" for k, v in errs.items()),
                    flush=True,
                )
            except Exception as e:  # noqa: BLE001
                print(f"{sname} {n}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
        rows.append(dict(shape=sname, cfg="ours", ms=t_ours))
        print(f"\n{sname} {shape}  ms per op (ours | quack configs)")
        print("op       dense   ours   " + "  ".join(f"{n:>13}" for n in tq))
        cell = lambda v: f"{v:13.3f}" if v is not None else f"{'-':>13}"  # noqa: E731
        for k in KINDS:
            print(f"{k:8} {t_dense[k]:6.3f} {t_ours[k]:6.3f} " + "  ".join(cell(tq[n].get(k)) for n in tq))
        tot = sum(t_ours.values())
        per_op = [[tq[n][k] for n in tq if k in tq[n]] for k in KINDS]
        best = sum(min(ts) for ts in per_op) if all(per_op) else float("nan")
        print(
            f"{'total':8} {sum(t_dense.values()):6.3f} {tot:6.3f} "
            + "  ".join(cell(sum(tq[n].values()) if len(tq[n]) == len(KINDS) else None) for n in tq)
            + f"   best-per-op {best:.3f}",
            flush=True,
        )
        del d, oo
        torch.cuda.empty_cache()
    with open(os.path.join(out, "quack_gemms.json"), "w") as f:
        json.dump(dict(card=torch.cuda.get_device_name(), compile_s=compile_s, rows=rows), f)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3])
    else:
        main()
