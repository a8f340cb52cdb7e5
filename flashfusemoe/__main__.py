"""``python -m flashfusemoe``: run a small MoE layer forward+backward on random data, check it against the
dense reference, and print timing, losses and a tokens-per-expert histogram.

CPU runs the ``torch`` backend; CUDA runs the fastest available one (``--backend`` overrides).
"""

from __future__ import annotations

import argparse
import time

import torch

from flashfusemoe import MoELayer, router_logits
from flashfusemoe.backends import get_backend
from flashfusemoe.backends.torch import dense_experts, route

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flashfusemoe", description=__doc__)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--ffn-dim", type=int, default=512, help="rows of w_up (2I for GLU)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--activation", default="swiglu")
    p.add_argument("--backend", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--iters", type=int, default=5)
    return p.parse_args()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _histogram(counts_E: torch.Tensor, width: int = 40) -> str:
    counts = counts_E.tolist()
    top = max(max(counts), 1)
    return "\n".join(f"  expert {e:3d} {c:7d} {'#' * round(width * c / top)}" for e, c in enumerate(counts))


def main() -> None:
    args = _parse()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    backend = get_backend(args.backend, device)
    torch.manual_seed(0)
    layer = MoELayer(
        args.d_model,
        args.ffn_dim,
        args.experts,
        args.top_k,
        args.activation,
        aux_loss_coeff=1e-2,
        z_loss_coeff=1e-3,
        backend=backend.NAME,
        device=device,
        dtype=dtype,
    )
    x_TD = torch.randn(args.tokens, args.d_model, device=device, dtype=dtype, requires_grad=True)

    def step() -> tuple[torch.Tensor, dict]:
        out, losses = layer(x_TD)
        (out.float().square().mean() + losses["aux_loss"] + losses["z_loss"]).backward()
        return out, losses

    out_TD, losses = step()  # warm-up (compilation, allocator)
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.iters):
        out_TD, losses = step()
    _sync(device)
    ms = (time.perf_counter() - start) / args.iters * 1e3

    with torch.no_grad():
        routing = route(router_logits(x_TD, layer.gate_weight), layer.router_config)
        ref_TD = dense_experts(
            x_TD.float(),
            routing.topk_ids_TK,
            routing.topk_weights_TK,
            layer.w_up.float(),
            layer.w_down.float(),
            args.activation,
        )
        rel_err = ((out_TD.float() - ref_TD).norm() / ref_TD.norm().clamp_min(1e-30)).item()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    print(
        f"flashfusemoe: backend={backend.NAME} device={device} dtype={dtype} T={args.tokens} "
        f"D={args.d_model} F={args.ffn_dim} E={args.experts} K={args.top_k} act={args.activation}"
    )
    print(f"forward+backward: {ms:.2f} ms/iter over {args.iters} iters")
    print(f"aux_loss={losses['aux_loss'].item():.5f} z_loss={losses['z_loss'].item():.5f}")
    print(f"check vs dense fp32 reference: rel err {rel_err:.2e} (tolerance {tolerance:.0e})")
    print("tokens per expert:\n" + _histogram(losses["tokens_per_expert"].cpu()))
    if not rel_err <= tolerance:
        raise SystemExit(f"FAILED: output differs from the reference (rel err {rel_err:.2e})")


if __name__ == "__main__":
    main()
