"""Train a decoder MoE LM end to end with MoELayer FFNs: one process, or expert-parallel under torchrun.

    python integration/full_integration.py                               # tiny preset (CPU is fine)
    python integration/full_integration.py --preset seed-1b --compile   # 1.16B total / 481M active, a GPU
    torchrun --nproc_per_node=2 integration/full_integration.py --ep_size 2 [--comm nccl|deepep]

The model: token embedding -> L x [RMSNorm -> causal SDPA attention (RoPE) -> RMSNorm -> MoELayer
(top-k experts + shared experts, aux and z losses)] -> RMSNorm -> LM head. Under EP (``--ep_size W`` =
the torchrun world) every rank holds all dense weights and E/W experts, takes 1/W of the global batch,
and averages the dense gradients with OverlappedGradSync (expert gradients scaled by 1/W, so EP = W
trains exactly like one process on the global batch; tested). The load-balance loss is each rank's own
unless ``--aux-loss-global`` counts every rank's routed slots (then the aux loss too trains like one
process); ``--seq-aux-loss-coeff`` adds DeepSeek-V3's sequence-wise loss. Checkpoints gather the
experts on save (one file, any EP size can resume it).

At the end: p50 step time (CUDA-event times on a GPU, the host a step ahead), tokens/s, peak memory,
model TFLOP/s and MFU against a dense bf16 GEMM ceiling measured in the same run (GPU), and the bytes an
MoE layer saves for backward (mean over the layers). ``--plot`` writes the loss curve and a
tokens-per-expert heatmap (layer x expert), with matplotlib if installed; ``--profile FILE`` the GPU
kernel time of 3 more steps by category and the longest GPU idle stretches. ``--compile`` compiles block
by block (CUDA graphs on one GPU) under an activation memory budget (``--memory-budget``, 0.95);
``--recompute [N]`` keeps no expert activations for backward in every block (or in the first N: less
memory, a few more GEMMs), ``--recompute-shared [N]`` none of the shared experts' (in the first N); the loss
never holds all ``[tokens, vocab]`` logits (``integration/lm_loss.py``); AdamW is one Triton kernel per
parameter tensor on a GPU (``integration/adamw.py``; ``--optimizer torch``: torch's fused one;
``--step-in-backward``: each tensor's update overlaps the rest of the backward); attention tries cuDNN's
kernel first (``--sdpa flash``: flash's), after RoPE's Triton kernels (``integration/rope.py``).
``--cuda-graph`` (one GPU) replays the whole step, optimizer included, as one CUDA graph after two eager
steps (``integration/graphed_step.py``).

Legend: B sequences, S sequence length, D model dim, L layers, E experts, W EP world size.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from any directory

from flashfusemoe import MoELayer, OverlappedGradSync, get_dense_params, get_expert_params  # noqa: E402
from integration.adamw import AdamW  # noqa: E402
from integration.graphed_step import GraphedStep  # noqa: E402
from integration.lm_loss import CHUNK as LOSS_CHUNK  # noqa: E402
from integration.lm_loss import lm_head_cross_entropy  # noqa: E402
from integration.rope import rope_qkv, rope_table  # noqa: E402

_MEMORY_BUDGET = 0.95  # --compile's default activation memory budget
_ALL = object()  # --recompute without a number: every block (no int: a typed -1 is refused)
# --sdpa: the attention kernel tried first, then the others in torch's order. cuDNN's is the default:
# seed-1b's attention forward+backward (B 4, S 2048, 16 heads of 64), H200: 0.47 ms a layer vs flash's
# 0.65 (docs/benchmarks.md). Where a backend cannot take the inputs (CPU: math only) the next one runs.
_SDPA_FIRST = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
_SDPA_REST = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

PRESETS = {
    "tiny": dict(d_model=64, layers=2, heads=4, experts=8, top_k=2, ffn_dim=128, shared=1, vocab=256,
                 seq=32, batch=4, steps=8, lr=3e-3),
    "seed-1b": dict(d_model=1024, layers=18, heads=16, experts=8, top_k=2, ffn_dim=4096, shared=1,
                    vocab=32000, seq=2048, batch=4, steps=30, lr=3e-4),
}  # fmt: skip


def sdpa_order(first: str) -> list[SDPBackend]:
    """The SDPA backends by priority, ``first`` (a key of ``_SDPA_FIRST``) leading."""
    head = _SDPA_FIRST[first]
    return [head, *(b for b in _SDPA_REST if b != head)]


class Attention(nn.Module):
    def __init__(self, D: int, heads: int, sdpa: str) -> None:
        super().__init__()
        self.heads, self.sdpa = heads, sdpa_order(sdpa)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.out = nn.Linear(D, D, bias=False)

    def forward(self, x_BSD: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        # new q, k, v tensors: SDPA keeps all three for backward, and a v viewed in the projection's
        # output would keep that whole [B, S, 3D] alive (seed-1b: 2 [T, D] bf16 more a block, 0.6 GB)
        qkv = rope_qkv(self.qkv(x_BSD).view(B, S, 3, self.heads, D // self.heads), rope)
        q, k, v = (t.transpose(1, 2) for t in qkv)  # [B, H, S, d]
        with sdpa_kernel(self.sdpa, set_priority=True):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, cfg: dict, moe_kw: dict) -> None:
        super().__init__()
        D = cfg["d_model"]
        self.norm1, self.norm2 = nn.RMSNorm(D), nn.RMSNorm(D)
        self.attn = Attention(D, cfg["heads"], cfg["sdpa"])
        self.moe = MoELayer(
            D, cfg["ffn_dim"], cfg["experts"], cfg["top_k"], num_shared_experts=cfg["shared"], **moe_kw
        )

    def forward(self, x_BSD: torch.Tensor, rope: torch.Tensor) -> tuple[torch.Tensor, dict]:
        x_BSD = x_BSD + self.attn(self.norm1(x_BSD), rope)
        y_BSD, losses = self.moe(self.norm2(x_BSD))
        return x_BSD + y_BSD, losses


def _recompute(block: int, recompute_blocks: int, recompute_shared_blocks: int) -> bool | str:
    """The ``recompute_activations`` of block ``block``'s MoE layer."""
    if block < recompute_blocks:
        return True
    return "shared" if block < recompute_shared_blocks else False


class MoELM(nn.Module):
    """A decoder LM whose FFNs are MoELayers. ``forward(ids [B, S])`` returns the next-token CE loss
    (mean over this call's tokens), the aux + z losses summed over layers, and each layer's counts.
    The MoE layers of the first ``recompute_blocks`` blocks recompute their expert activations, those of
    the first ``recompute_shared_blocks`` their shared experts' (blocks beyond both keep everything)."""

    def __init__(
        self, cfg: dict, recompute_blocks: int = 0, recompute_shared_blocks: int = 0, **moe_kw
    ) -> None:
        super().__init__()
        D = cfg["d_model"]
        self.embed = nn.Embedding(cfg["vocab"], D)
        self.blocks = nn.ModuleList(
            Block(
                cfg,
                dict(moe_kw, recompute_activations=_recompute(i, recompute_blocks, recompute_shared_blocks)),
            )
            for i in range(cfg["layers"])
        )
        self.norm = nn.RMSNorm(D)
        self.head = nn.Linear(D, cfg["vocab"], bias=False)
        self.loss_chunk = cfg.get("loss_chunk", LOSS_CHUNK)
        # computed once, not per call; cast with the model like the rest (not in the state dict)
        self.register_buffer("rope", rope_table(cfg["seq"], D // cfg["heads"]), persistent=False)
        with torch.no_grad():
            self.embed.weight.normal_(0.0, 1.0)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    m.weight.normal_(0.0, 1.0 / math.sqrt(m.in_features))

    def moe_layers(self) -> list[MoELayer]:
        return [b.moe for b in self.blocks]

    def forward(self, ids_BS: torch.Tensor):
        x = self.embed(ids_BS[:, :-1])
        aux = x.new_zeros((), dtype=torch.float32)
        counts = []
        for block in self.blocks:
            x, losses = block(x, self.rope)
            aux = aux + losses["aux_loss"] + losses["z_loss"] + losses["seq_aux_loss"]
            counts.append(losses["tokens_per_expert"])
        # fp32 logits chunk by chunk, never all [B*S, vocab] of them (integration/lm_loss.py)
        ce = lm_head_cross_entropy(
            self.norm(x).flatten(0, 1), self.head.weight, ids_BS[:, 1:].flatten(), self.loss_chunk
        )
        return ce, aux, torch.stack(counts)


def param_counts(cfg: dict) -> tuple[int, int]:
    """(total, active per token) parameters of the unsharded model."""
    D, L, E, K, F_, V = (cfg[k] for k in ("d_model", "layers", "experts", "top_k", "ffn_dim", "vocab"))
    I = F_ // 2
    expert = F_ * D + D * I
    dense = V * D * 2 + L * (4 * D * D + 2 * D + E * D + cfg["shared"] * expert) + D
    return dense + L * E * expert, dense + L * K * expert


def batch(args, cfg: dict, step: int, data: torch.Tensor | None) -> torch.Tensor:
    """The global batch of a step, ``[B, S+1]`` tokens, identical on every rank (a seeded generator)."""
    g = torch.Generator().manual_seed(args.seed * 100003 + step)
    B, S = cfg["batch"], cfg["seq"]
    if data is None:
        return torch.randint(0, cfg["vocab"], (B, S + 1), generator=g)
    starts = torch.randint(0, data.numel() - S - 1, (B,), generator=g)
    return torch.stack([data[s : s + S + 1] for s in starts.tolist()])


def _group_reduce(t: torch.Tensor, W: int, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if W > 1:
        dist.all_reduce(t, op=op)
    return t


def _gather_experts(t: torch.Tensor, W: int) -> torch.Tensor:
    """[e, ...] on every rank -> [E, ...] in rank order."""
    if W == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(W)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _saved_buffers(model: MoELM):
    """The buffers a checkpoint holds: the state dict's (expert biases), not the RoPE table."""
    keys = model.state_dict().keys()
    return [(n, b) for n, b in model.named_buffers() if n in keys]


def save_checkpoint(path: Path, model: MoELM, opt, step: int, W: int, rank: int) -> None:
    """One file with the unsharded model and AdamW state (experts gathered from every rank)."""
    experts = {id(p) for p in get_expert_params(model)}
    state, optim = {}, {}
    for name, p in model.named_parameters():
        full = _gather_experts(p.detach(), W) if id(p) in experts else p.detach()
        state[name] = full.cpu()
        s = opt.state.get(p, {})
        optim[name] = {
            k: (_gather_experts(v, W) if id(p) in experts and v.dim() > 0 else v).cpu() for k, v in s.items()
        }
    buffers = {n: b.cpu() for n, b in _saved_buffers(model)}
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        torch.save({"model": state, "buffers": buffers, "optim": optim, "step": step}, path / "checkpoint.pt")
    if W > 1:
        dist.barrier()


def load_checkpoint(path: Path, model: MoELM) -> dict:
    """Load the unsharded weights into ``model`` (before sharding); returns the checkpoint."""
    ckpt = torch.load(path / "checkpoint.pt", map_location="cpu", weights_only=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(ckpt["model"][name])
        for name, b in _saved_buffers(model):
            b.copy_(ckpt["buffers"][name])
    return ckpt


def restore_optimizer(opt, model: MoELM, ckpt: dict, rank: int) -> None:
    """AdamW state from the checkpoint, each expert tensor sliced to this rank's experts."""
    experts = {id(p) for p in get_expert_params(model)}
    for name, p in model.named_parameters():
        saved = ckpt["optim"].get(name, {})
        if not saved:
            continue
        e = p.shape[0]
        opt.state[p] = {
            k: (v[rank * e : (rank + 1) * e] if id(p) in experts and v.dim() > 0 else v).to(p.device)
            for k, v in saved.items()
        }


def saved_bytes_of_one_layer(layer: MoELayer, x_TD: torch.Tensor) -> int:
    """Activation bytes the layer's forward saves for backward: saved-tensor hooks, storages counted once,
    the layer's own parameters (saved by reference, not copied) left out."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, _ = layer(x_TD.detach().requires_grad_())
    del out
    return sum(seen.values())


def _progress(steps: int, quiet: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and not quiet:
        return tqdm(total=steps, desc="train", dynamic_ncols=True)

    class Plain:
        def __init__(self):
            self.n = 0

        def update(self, k=1):
            self.n += k
            if not quiet and (self.n % max(1, steps // 10) == 0 or self.n == steps):
                print(f"step {self.n}/{steps}", flush=True)

        def set_postfix_str(self, s):
            pass

        def close(self):
            pass

    return Plain()


def _plot(path: str, losses: list[float], counts_LE: torch.Tensor) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed; no plot written", flush=True)
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    a.plot(range(1, len(losses) + 1), losses)
    a.set(xlabel="step", ylabel="loss", title="training loss")
    share = counts_LE / counts_LE.sum(1, keepdim=True).clamp_min(1)
    im = b.imshow(share.numpy(), aspect="auto", cmap="viridis")
    b.set(xlabel="expert", ylabel="layer", title="share of tokens per expert")
    fig.colorbar(im, ax=b)
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}", flush=True)


def _profile(path: str, train_step, rank: int, steps: int = 3) -> None:
    """GPU kernel time of ``steps`` more steps (after the timed ones and the checkpoint) by category."""
    from torch.profiler import ProfilerActivity, profile

    from integration.kernel_table import kernel_table

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            train_step(i)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    if rank == 0:
        table = kernel_table(prof, steps)
        Path(path).write_text(table + "\n")
        print(table, flush=True)


def train(args) -> dict:
    """Run the training loop; returns the per-step global losses and the summary."""
    W = int(os.environ.get("WORLD_SIZE", 1))
    if args.ep_size != W:
        raise SystemExit(f"--ep_size {args.ep_size} must equal the torchrun world size {W} (EP only)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank = int(os.environ.get("RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if W > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if args.cuda_graph and (device.type != "cuda" or W > 1 or args.compile_mode == "reduce-overhead"):
        raise SystemExit(
            "--cuda-graph captures the whole step on one GPU: it needs CUDA, no EP (the all-to-all's "
            "splits go through the host) and no --compile-mode reduce-overhead (graphs in a graph)"
        )
    cfg = dict(PRESETS[args.preset])
    for key in ("steps", "batch", "seq", "layers"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    cfg["sdpa"], cfg["loss_chunk"] = args.sdpa, args.loss_chunk
    recompute, recompute_shared = (
        cfg["layers"] if n is _ALL else n for n in (args.recompute, args.recompute_shared)
    )
    for flag, n in (("--recompute", args.recompute), ("--recompute-shared", args.recompute_shared)):
        if n is not _ALL and not 0 <= n <= cfg["layers"]:
            raise SystemExit(f"{flag} {n}: a number of blocks in [0, {cfg['layers']}]")
    if cfg["batch"] % W:
        raise SystemExit(f"the global batch {cfg['batch']} must divide by the EP size {W}")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    torch.manual_seed(args.seed)
    model = MoELM(
        cfg, aux_loss_coeff=args.aux_loss_coeff, z_loss_coeff=args.z_loss_coeff,
        seq_aux_loss_coeff=args.seq_aux_loss_coeff,
        use_expert_bias=args.expert_bias, backend=args.backend, recompute_blocks=recompute,
        recompute_shared_blocks=recompute_shared,
    )  # fmt: skip
    ckpt = load_checkpoint(Path(args.resume), model) if args.resume else None
    model = model.to(device=device, dtype=dtype)
    for layer in model.moe_layers():
        if layer.expert_bias is not None:
            layer.expert_bias.data = layer.expert_bias.data.float()  # the bias stays fp32
        if W > 1:
            layer.shard_experts(None, communicator=args.comm)
            if args.aux_loss_global:  # the load-balance loss counts every rank's routed slots
                layer.aux_loss_group = dist.group.WORLD
    optimizer = args.optimizer or ("triton" if device.type == "cuda" else "torch")
    # capturable: the step counts on the GPU, so that a graph of the step replays real steps
    opt_kw = dict(lr=cfg["lr"], weight_decay=0.0, capturable=args.cuda_graph)
    if args.step_in_backward and (optimizer != "triton" or W > 1):
        raise SystemExit(
            "--step-in-backward updates each parameter as backward finishes its gradient: it needs "
            "--optimizer triton and no EP (the dense gradients are all-reduced after backward)"
        )
    if optimizer == "triton":  # a Triton kernel per parameter tensor: 3.7 TB/s, torch's fused 2.8 (H200)
        opt = AdamW(model.parameters(), step_in_backward=args.step_in_backward, **opt_kw)
    else:  # fused: one kernel over all parameters, no foreach temporaries the size of the model
        opt = torch.optim.AdamW(model.parameters(), fused=device.type == "cuda", **opt_kw)
    start = 0
    if ckpt is not None:
        restore_optimizer(opt, model, ckpt, rank)
        start = ckpt["step"]
    sync = (
        OverlappedGradSync(
            get_dense_params(model), None, num_buckets=4, expert_params=get_expert_params(model)
        )
        if W > 1
        else None
    )
    if args.compile:  # block by block: the 18 identical blocks share one compiled graph
        mode = args.compile_mode
        if mode is None and device.type == "cuda" and W == 1 and not args.cuda_graph:
            # CUDA graphs: without them the host launches slower than the GPU runs (seed-1b, H200: 87 ms
            # a step vs 60). EP stays eager-launched: the all-to-all's splits come through the host.
            mode = "reduce-overhead"
        if args.step_in_backward and mode == "reduce-overhead":
            raise SystemExit(
                "--step-in-backward under block-by-block CUDA graphs (reduce-overhead) is untested: its "
                "updates would read gradients in cudagraph trees' memory from another stream; use "
                "--cuda-graph"
            )
        # The partitioner then also recomputes pointwise ops (norms, activations) it would save:
        # seed-1b, H200: -0.6 GB at the same step time (docs/benchmarks.md)
        budget = _MEMORY_BUDGET if args.memory_budget is None else args.memory_budget
        torch._functorch.config.activation_memory_budget = budget
        for block in model.blocks:
            block.compile(mode=mode)
    data = None
    if args.data:
        data = torch.frombuffer(bytearray(Path(args.data).read_bytes()), dtype=torch.uint8).long()
        if cfg["vocab"] < 256 or data.numel() < cfg["seq"] + 2:
            raise SystemExit("--data needs vocab >= 256 (byte tokens) and a file longer than a sequence")
    per_rank = cfg["batch"] // W
    losses, counts_LE = [], None
    bar = _progress(cfg["steps"] - start, args.quiet or rank != 0)

    def step_on(ids: torch.Tensor, phases: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on this rank's ``ids``; (global CE loss, counts [L, E]). ``phases``: filled
        with the peak GPU memory (GB) of forward, backward and the optimizer step."""
        _peak_of(phases, None)
        ce, aux, counts = model(ids)
        _peak_of(phases, "forward")
        (ce + aux).backward()
        if sync is not None:
            sync.finish()
        _peak_of(phases, "backward")
        opt.step()
        opt.zero_grad(set_to_none=True)
        _peak_of(phases, "optimizer")
        counts = _group_reduce(counts.float(), W)
        if args.expert_bias:
            for layer, c in zip(model.moe_layers(), counts, strict=True):
                layer.update_expert_bias(c)
        return _group_reduce(ce.detach().float().clone(), W) / W, counts

    graphed = GraphedStep(step_on) if args.cuda_graph else None

    def host_ids(step: int) -> torch.Tensor:
        """This rank's share of the step's global batch on the host (pinned for a GPU: copied async)."""
        ids = batch(args, cfg, step, data)[rank * per_rank : (rank + 1) * per_rank]
        return ids.pin_memory() if device.type == "cuda" else ids

    def train_step(
        step: int, phases: dict | None = None, ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``step_on`` the step's ids (``host_ids(step)`` unless given), replayed as one CUDA graph with
        ``--cuda-graph`` after its eager warm-up steps (``phases`` then stays empty)."""
        ids = (host_ids(step) if ids is None else ids).to(device, non_blocking=True)
        return graphed(ids) if graphed is not None else step_on(ids, phases)

    # The host runs one step ahead of the GPU, as a training loop that logs asynchronously does: a
    # step's loss is read once the next step is queued, and steps are timed on the GPU's timeline (CUDA
    # events; a host that falls behind shows as idle time inside the steps).
    phases, step_peaks, next_ids, queued = None, [], host_ids(start), None
    loop_t0 = time.perf_counter()
    marks = [_mark(device)]  # a step's start; the next one's start is its end

    def record(done: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Read a finished step's (loss, counts): waits for that step only."""
        nonlocal counts_LE
        losses.append(done[0].item())
        counts_LE = done[1].cpu() if counts_LE is None else counts_LE + done[1].cpu()
        bar.update(1)
        bar.set_postfix_str(f"loss {losses[-1]:.4f}")

    for step in range(start, cfg["steps"]):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()  # the allocator's counters are host-side: no sync
            if step == cfg["steps"] - 1:  # the last step says where the peak falls (host-side counters)
                phases = {}
        loss, counts = train_step(step, phases, next_ids)
        outputs = (loss.clone(), counts.clone())  # a graphed step's next replay overwrites its own
        marks.append(_mark(device))
        if device.type == "cuda":
            step_peaks.append(max([torch.cuda.max_memory_allocated() / 1e9, *(phases or {}).values()]))
        # the next batch is built while the GPU runs this step (a data loader's prefetch), not after
        next_ids = host_ids(step + 1) if step + 1 < cfg["steps"] else None
        if queued is not None:
            record(queued)
        queued = outputs
    if queued is not None:
        record(queued)
    times, loop_s = _elapsed_s(marks), time.perf_counter() - loop_t0
    bar.close()
    if args.save:
        save_checkpoint(Path(args.save), model, opt, cfg["steps"], W, rank)
    summary = summarize(args, cfg, model, times, device, dtype, W, phases, step_peaks, loop_s)
    if args.profile:
        _profile(args.profile, lambda i: train_step(cfg["steps"] + i), rank)
    if W > 1:
        dist.destroy_process_group()
    result = {
        "losses": losses,
        "summary": summary,
        "counts": counts_LE.tolist() if counts_LE is not None else [],
    }
    if rank == 0:
        if args.metrics:
            Path(args.metrics).write_text(json.dumps(result))
        if args.plot and counts_LE is not None:
            _plot(args.plot, losses, counts_LE)
    return result


def _mark(device: torch.device):
    """A point on the timeline steps run on: a recorded CUDA event on a GPU, the host clock otherwise."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _elapsed_s(marks: list) -> list[float]:
    """Seconds between consecutive ``_mark``s (waits for the last event)."""
    pairs = zip(marks[:-1], marks[1:], strict=True)
    if marks and isinstance(marks[0], torch.cuda.Event):
        marks[-1].synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in pairs]
    return [b - a for a, b in pairs]


def _peak_of(phases: dict | None, name: str | None) -> None:
    """Record the peak GPU memory since the last call as ``phases[name]`` (GB) and start a new one."""
    if phases is None:
        return
    if name is not None:
        phases[name] = torch.cuda.max_memory_allocated() / 1e9
    torch.cuda.reset_peak_memory_stats()


def summarize(
    args,
    cfg: dict,
    model: MoELM,
    times: list[float],
    device,
    dtype,
    W: int,
    phases: dict | None = None,
    step_peaks: list[float] | None = None,
    loop_s: float | None = None,
) -> dict:
    total, active = param_counts(cfg)
    tokens = cfg["batch"] * cfg["seq"]
    timed = times[2:] if len(times) > 4 else times  # the first steps compile and tune
    p50 = statistics.median(timed) if timed else float("nan")
    # 6 FLOPs per active parameter and token (forward + backward), plus causal attention's scores
    flops = 6 * active * tokens + 6 * cfg["layers"] * cfg["d_model"] * cfg["seq"] * tokens
    out = dict(
        preset=args.preset, ep_size=W, backend=model.moe_layers()[0].backend, params_total=total,
        params_active=active, p50_step_s=p50, tokens_per_s=tokens / p50, model_tflops=flops / p50 / 1e12,
        first_step_s=times[0] if times else float("nan"), step_times_s=times, loop_wall_s=loop_s,
    )  # fmt: skip
    layers = model.moe_layers()
    x = torch.randn(
        cfg["batch"] // W * cfg["seq"], cfg["d_model"], device=device, dtype=dtype
    )  # a step's rows
    # the mean over layers: those that recompute keep less (one of each kind measured)
    saved = {}
    for layer in layers:
        if layer.recompute_activations not in saved:
            saved[layer.recompute_activations] = saved_bytes_of_one_layer(layer, x)
    out["saved_bytes_per_moe_layer"] = sum(saved[m.recompute_activations] for m in layers) // len(layers)
    out["recompute_blocks"] = sum(m.recompute_activations is True for m in layers)
    out["recompute_shared_blocks"] = sum(m.recompute_activations in (True, "shared") for m in layers)
    if device.type == "cuda":
        from integration.bench_layer import dense_ceiling_tflops

        # the counters restart every step. Under CUDA graphs (reduce-overhead) a replay allocates nothing
        # (its memory sits in the graph pool, counted at capture): later steps and their phases then show
        # only what runs outside the graphs.
        out["peak_memory_GB"] = max(step_peaks or [torch.cuda.max_memory_allocated() / 1e9])
        out["peak_GB_by_step"] = step_peaks
        out["reserved_GB"] = torch.cuda.memory_reserved() / 1e9
        if phases:
            out["peak_GB_by_phase"] = phases
        out["gemm_ceiling_tflops"] = dense_ceiling_tflops()
        out["mfu"] = out["model_tflops"] / W / out["gemm_ceiling_tflops"]
        out["card"] = torch.cuda.get_device_name()
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(out), flush=True)
    return out


def parse_args(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="global batch (sequences), split over EP ranks")
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--ep_size", type=int, default=1, help="EP world size: the torchrun world")
    p.add_argument("--comm", default=None, help="communicator under EP (nccl, deepep; default: auto)")
    p.add_argument("--backend", default=None, help="compute backend (triton, torch: the unfused reference)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on GPU, fp32 on CPU"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument(
        "--compile-mode", default=None,
        help="torch.compile mode (default: reduce-overhead on one GPU, the default mode otherwise)",
    )  # fmt: skip
    p.add_argument(
        "--cuda-graph", action="store_true",
        help="one GPU: replay the whole step (forward, backward, AdamW) as one CUDA graph after 2 eager "
        "steps (with --compile the blocks then compile in the default mode)",
    )  # fmt: skip
    p.add_argument(
        "--sdpa", choices=sorted(_SDPA_FIRST), default="cudnn",
        help="the attention kernel tried first (the others follow in torch's order; default cudnn)",
    )  # fmt: skip
    p.add_argument(
        "--recompute", nargs="?", type=int, const=_ALL, default=0, metavar="N",
        help="the MoE layers of every block (of the first N blocks with N) recompute their expert "
        "activations in backward: less memory, a few more GEMMs",
    )  # fmt: skip
    p.add_argument(
        "--recompute-shared", nargs="?", type=int, const=_ALL, default=0, metavar="N",
        help="the shared experts of every block (of the first N blocks with N) recompute their "
        "activations in backward (the blocks --recompute covers recompute theirs already)",
    )  # fmt: skip
    p.add_argument(
        "--memory-budget", type=float, default=None,
        help=f"with --compile: torch's activation memory budget in (0, 1] (torch._functorch.config."
        f"activation_memory_budget; lower: the partitioner recomputes more in backward; 1: torch's "
        f"default; default {_MEMORY_BUDGET})",
    )  # fmt: skip
    p.add_argument(
        "--loss-chunk", type=int, default=LOSS_CHUNK, metavar="TOKENS",
        help=f"tokens per chunk of the LM head's loss: fp32 logits of that many tokens live at a time "
        f"(default {LOSS_CHUNK})",
    )  # fmt: skip
    p.add_argument(
        "--optimizer", choices=["triton", "torch"], default=None,
        help="AdamW: triton (integration/adamw.py; the default on a GPU) or torch's (fused on a GPU)",
    )  # fmt: skip
    p.add_argument(
        "--step-in-backward", action="store_true",
        help="--optimizer triton, one process: each parameter's AdamW update starts on a side stream as "
        "soon as backward has its gradient, beside the rest of the backward",
    )  # fmt: skip
    p.add_argument("--aux-loss-coeff", type=float, default=0.01)
    p.add_argument("--z-loss-coeff", type=float, default=0.001)
    p.add_argument(
        "--aux-loss-global", action="store_true",
        help="under EP: the load-balance loss counts the routed slots of every rank (the global batch's "
        "balance, as Qwen3 trains); the EP run then trains like one process on the same global batch",
    )  # fmt: skip
    p.add_argument(
        "--seq-aux-loss-coeff", type=float, default=0.0,
        help="DeepSeek-V3's sequence-wise balance loss over each of the batch's sequences",
    )  # fmt: skip
    p.add_argument("--expert-bias", action="store_true", help="aux-loss-free balancing (all-reduced counts)")
    p.add_argument("--data", default=None, help="a file of bytes to train on (byte-level tokens)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save", default=None, help="write a checkpoint here at the end")
    p.add_argument("--resume", default=None, help="resume from a checkpoint (written at any EP size)")
    p.add_argument("--metrics", default=None, help="write the losses and the summary here as JSON")
    p.add_argument("--plot", default=None, help="loss curve and tokens-per-expert heatmap (PNG)")
    p.add_argument(
        "--profile", default=None, help="profile 3 more steps: GPU kernel time by category, idle stretches"
    )
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.loss_chunk < 1:
        p.error(f"--loss-chunk={args.loss_chunk}: a number of tokens >= 1")
    if args.memory_budget is not None and not (args.compile and 0 < args.memory_budget <= 1):
        p.error(f"--memory-budget={args.memory_budget} needs --compile and a value in (0, 1]")
    return args


if __name__ == "__main__":
    train(parse_args())
