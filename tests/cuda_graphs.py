"""A layer's forward+backward captured in a CUDA graph and replayed on new inputs, against eager."""

from __future__ import annotations

import torch


def check_graph_replays_match_eager(layer, reference, T: int, D: int, *, no_sync: bool = False) -> None:
    """Capture ``layer``'s bf16 forward+backward (after a warm-up on a side stream), replay it on new
    inputs and require out, x.grad, w_up.grad and gate_weight.grad equal to ``reference`` run eagerly,
    bit for bit. ``no_sync``: one eager step under ``torch.cuda.set_sync_debug_mode("error")`` first,
    so that any host sync fails the test before capture would."""
    static_x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    static_g = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # Triton compiles here, off the capture
        for _ in range(2):
            layer(static_x)[0].backward(static_g)
    torch.cuda.current_stream().wait_stream(stream)
    if no_sync:
        torch.cuda.set_sync_debug_mode("error")
        try:
            layer(static_x)[0].backward(static_g)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = layer(static_x)[0]
        static_out.backward(static_g)
    for seed in range(2):
        torch.manual_seed(10 + seed)
        new_x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        for p in [static_x, *layer.parameters()]:
            p.grad.zero_()
        static_x.data.copy_(new_x)
        graph.replay()
        x = new_x.clone().requires_grad_()
        reference.zero_grad(set_to_none=True)
        out = reference(x)[0]
        out.backward(static_g)
        assert torch.equal(static_out, out) and torch.equal(static_x.grad, x.grad)
        assert torch.equal(layer.w_up.grad, reference.w_up.grad)
        assert torch.equal(layer.gate_weight.grad, reference.gate_weight.grad)
