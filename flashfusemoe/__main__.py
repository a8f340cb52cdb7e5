"""``python -m flashfusemoe``: run a small MoE layer forward+backward on random data, check its output
and every gradient against an independent dense formulation in fp32, and print timing, losses and a
tokens-per-expert histogram.

The check: the layer's router and experts (``--backend``: on CPU the ``torch`` reference, on CUDA the
fused ``triton`` kernels) against ``dense_experts`` (every expert on every token, then a dense
``[T, E]`` combine: no routing-order bookkeeping in common), both differentiated by autograd, on the
same routing, in fp32 upcasts of the same weights.
"""

from __future__ import annotations

import argparse
import time

import torch

from flashfusemoe import ACTIVATIONS, MoELayer, router_logits
from flashfusemoe.backends import available_backends, get_backend
from flashfusemoe.backends.torch import dense_experts, route

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m flashfusemoe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tokens", type=_positive, default=2048, help="T, tokens in the batch (default 2048)")
    p.add_argument("--d-model", type=_positive, default=256, help="D, model width (default 256)")
    p.add_argument("--ffn-dim", type=_positive, default=512, help="rows of each expert's w_up: 2I for GLU")
    p.add_argument("--experts", type=_positive, default=8, help="E, routed experts (default 8)")
    p.add_argument("--top-k", type=_positive, default=2, help="K, experts per token, <= E (default 2)")
    p.add_argument("--activation", default="swiglu", choices=ACTIVATIONS)
    p.add_argument("--backend", default=None, choices=available_backends(), help="default: fastest that runs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--iters", type=_positive, default=5, help="timed forward+backward steps (default 5)")
    p.add_argument("--warmup", type=_positive, default=2, help="untimed steps first (JIT, allocator)")
    args = p.parse_args(argv)
    if args.top_k > args.experts:
        p.error(f"--top-k {args.top_k} must be <= --experts {args.experts}")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _histogram(counts_E: torch.Tensor, width: int = 40) -> str:
    counts = counts_E.tolist()
    top = max(max(counts), 1)
    return "\n".join(f"  expert {e:3d} {c:7d} {'#' * round(width * c / top)}" for e, c in enumerate(counts))


def _dense_reference(layer: MoELayer, x_TD: torch.Tensor, cot_TD: torch.Tensor) -> dict[str, torch.Tensor]:
    """Output and gradients (x, router, w_up, w_down) of the dense formulation, fp32."""
    x = x_TD.detach().float().requires_grad_()
    gate, w_up, w_down = (
        p.detach().float().requires_grad_() for p in (layer.gate_weight, layer.w_up, layer.w_down)
    )
    r = route(router_logits(x, gate), layer.router_config)
    out = dense_experts(x, r.topk_ids_TK, r.topk_weights_TK, w_up, w_down, layer.activation)
    (out * cot_TD).sum().backward()
    return {
        "out": out,
        "x.grad": x.grad,
        "gate_weight.grad": gate.grad,
        "w_up.grad": w_up.grad,
        "w_down.grad": w_down.grad,
    }


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
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
    cot_TD = torch.randn(args.tokens, args.d_model, device=device)

    def step() -> tuple[torch.Tensor, dict]:
        layer.zero_grad(set_to_none=True)
        x_TD.grad = None
        out, losses = layer(x_TD)
        (out.float() * cot_TD).sum().backward()
        return out, losses

    for _ in range(args.warmup):  # Triton compiles on the first call: keep it out of the timing
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.iters):
        out_TD, losses = step()
    _sync(device)
    ms = (time.perf_counter() - start) / args.iters * 1e3

    ref = _dense_reference(layer, x_TD, cot_TD)
    got = {"out": out_TD, "x.grad": x_TD.grad}
    got.update({n + ".grad": getattr(layer, n).grad for n in ("gate_weight", "w_up", "w_down")})
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    print(
        f"flashfusemoe: backend={backend.NAME} device={device} dtype={dtype} T={args.tokens} "
        f"D={args.d_model} F={args.ffn_dim} E={args.experts} K={args.top_k} act={args.activation}"
    )
    print(f"forward+backward: {ms:.2f} ms/iter over {args.iters} iters (after {args.warmup} warm-up)")
    print(f"aux_loss={losses['aux_loss'].item():.5f} z_loss={losses['z_loss'].item():.5f}")
    what = "the dense fp32 formulation (every expert on every token, dense combine)"
    print(f"check vs {what}, tolerance {tolerance:.0e}:")
    failed = []
    for name, want in ref.items():
        err = ((got[name].float() - want).norm() / want.norm().clamp_min(1e-30)).item()
        print(f"  {name:17s} rel err {err:.2e}")
        if not err <= tolerance:
            failed.append(name)
    print("tokens per expert:\n" + _histogram(losses["tokens_per_expert"].cpu()))
    if failed:
        raise SystemExit(f"FAILED: {', '.join(failed)} differ from the dense formulation")


if __name__ == "__main__":
    main()
