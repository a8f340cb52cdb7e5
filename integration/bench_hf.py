"""A training step of a small Qwen3-MoE-like Hugging Face model per experts implementation, same run.

    python -m integration.bench_hf [--layers 4] [--tokens 8192] [--rounds 3]

Implementations: HF's ``grouped_mm`` (its default), ``flashfusemoe`` (ours, through
``flashfusemoe.integrations.hf``), HF's ``sonicmoe`` where it loads (it fetches its kernel from the
``kernels`` hub), and ``sonicmoe_wheel``: the same SonicMoE kernels from an installed ``sonic-moe`` wheel
(``../shared/tools/sonicmoe-wheels.sh``) through a small adapter here, where ``import sonicmoe`` works.
SonicMoE's first call per shape autotunes (minutes): it happens in the untimed first step.
A step = forward + backward + AdamW, bf16, on one GPU; interleaved rounds, median of each round's
median; the ratio is against ``grouped_mm`` in the same run. The loss of the first step is printed per
implementation (same weights, same tokens) as a numerics check.

Legend: T tokens per step, H hidden size, E experts, K top-k.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch

from flashfusemoe.integrations import hf
from integration.bench_layer import emit, timed


def _model(args):
    import transformers

    config = transformers.Qwen3MoeConfig(
        hidden_size=1024, num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=4,
        head_dim=64, moe_intermediate_size=768, num_experts=64, num_experts_per_tok=8, vocab_size=32000,
        norm_topk_prob=True, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda()


def sonic_wheel_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """HF experts interface over the ``sonic-moe`` wheel's general-routing entry point (gated SiLU
    experts in HF's concatenated gate-then-up layout: SonicMoE's ``concat_layout``)."""
    import sonicmoe
    from sonicmoe.enums import ActivationType

    S, K = top_k_index.shape
    token_idx = torch.arange(S, device=hidden_states.device, dtype=torch.int32).repeat_interleave(K)
    out, _ = sonicmoe.moe_general_routing_inputs(
        hidden_states, top_k_weights.reshape(-1).float(), token_idx, top_k_index.reshape(-1).int(),
        self.gate_up_proj.permute(1, 2, 0), None, self.down_proj.permute(1, 2, 0), None,
        E=self.num_experts, stream_id=torch.cuda.current_stream().cuda_stream,
        activation_type=ActivationType.SWIGLU, is_inference_mode_enabled=not torch.is_grad_enabled(),
        concat_layout=True,
    )  # fmt: skip
    return out


def _register_sonic_wheel() -> bool:
    try:
        import sonicmoe  # noqa: F401
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError as exc:
        print(f"sonicmoe_wheel: not run ({exc})", flush=True)
        return False
    ALL_EXPERTS_FUNCTIONS.register("sonicmoe_wheel", sonic_wheel_experts_forward)
    return True


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=8192, help="tokens per step (batch x 2048)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--write", default=None, help="write the table into its block of this page")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    hf.register(backend="triton")
    base = _model(args)
    ids = torch.randint(0, 32000, (args.tokens // 2048, 2048), device="cuda")
    steps, first_loss = {}, {}
    impls = ["grouped_mm", hf.NAME, "sonicmoe"] + ["sonicmoe_wheel"] * _register_sonic_wheel()
    for impl in impls:
        model = copy.deepcopy(base)
        try:
            model.set_experts_implementation(impl)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step(model=model, opt=opt):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss

            first_loss[impl] = step().item()
        except Exception as exc:  # sonicmoe (or its kernels) not installed: report, time the others
            print(f"{impl}: not run ({type(exc).__name__}: {str(exc)[:200]})", flush=True)
            continue
        steps[impl] = step
    times = {impl: [] for impl in steps}
    for _ in range(args.rounds):
        for impl, step in steps.items():
            times[impl].append(timed(step, iters=10, warmup=2))
    base_ms = statistics.median(times["grouped_mm"])
    rows = [
        dict(impl=impl, step_ms=statistics.median(ts), vs_grouped_mm=statistics.median(ts) / base_ms,
             first_loss=first_loss[impl])
        for impl, ts in times.items()
    ]  # fmt: skip
    for r in rows:
        print(json.dumps(r), flush=True)
    card = torch.cuda.get_device_name()
    lines = [
        f"## HF Qwen3-MoE-like training step ({card}; {args.layers} layers, H 1024, E 64, K 8, I 768, "
        f"{args.tokens} tokens, bf16, AdamW)",
        "",
        "| experts implementation | step ms | vs grouped_mm | first-step loss |",
        "|---|---|---|---|",
    ]
    for r in rows:
        ms, ratio, loss = r["step_ms"], r["vs_grouped_mm"], r["first_loss"]
        lines.append(f"| {r['impl']} | {ms:.2f} | {ratio:.3f} | {loss:.4f} |")
    emit("\n".join(lines) + "\n", rows, args.write, args.json, section="bench_hf")


if __name__ == "__main__":
    main()
