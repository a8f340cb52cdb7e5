"""A whole training step (forward, backward, optimizer step) as one CUDA graph: ``GraphedStep``.

Block-by-block CUDA graphs (``torch.compile(mode="reduce-overhead")``) still leave the host launching
everything between the graphs (embedding, loss, optimizer) and copying each graph's inputs into its
static buffers; when the host falls behind, the GPU idles (seed-1b on an H200: ~2 ms a step). One
graph of the whole step removes both. It needs what the single-GPU path already guarantees: no host
syncs, fixed shapes, and an optimizer that reads its step count from device memory (``capturable``).

Legend: B sequences, S+1 tokens per sequence.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["GraphedStep"]


class GraphedStep:
    """``step_fn(ids [B, S+1]) -> tuple of tensors``, run eagerly for ``warmup`` calls (compilation,
    autotuning and lazy allocations happen there, on a side stream as CUDA graphs require), captured
    on the next call and replayed from then on, its ids copied into the captured input first.

    A call returns the graph's output tensors themselves: the next call overwrites them. Parameters'
    ``.grad`` are whatever ``step_fn`` leaves (it should set them to None: the captured backward then
    writes fresh gradients each replay). Anything ``step_fn`` reads besides ``ids`` (parameters,
    optimizer state, buffers) must keep its storage: the graph replays the captured addresses."""

    def __init__(self, step_fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], warmup: int = 2):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 eager step before the capture, got {warmup}")
        self.step_fn, self.warmup, self.calls = step_fn, warmup, 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._ids: torch.Tensor | None = None
        self._out: tuple[torch.Tensor, ...] = ()

    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not ids.is_cuda:
            raise ValueError(f"ids must be on a CUDA device (the graph is captured there), got {ids.device}")
        self.calls += 1
        if self._graph is None and self.calls <= self.warmup:
            side = self._stream(ids.device)
            side.wait_stream(torch.cuda.current_stream(ids.device))
            with torch.cuda.stream(side):
                out = self.step_fn(ids)
            torch.cuda.current_stream(ids.device).wait_stream(side)
            return out
        if self._graph is None:
            self._capture(ids)
        elif ids.shape != self._ids.shape or ids.dtype != self._ids.dtype:
            raise ValueError(
                f"ids must be {self._ids.dtype} {tuple(self._ids.shape)} as captured, got {ids.dtype} "
                f"{tuple(ids.shape)}"
            )
        else:
            self._ids.copy_(ids)
        self._graph.replay()  # the capture recorded the step without running it
        return self._out

    def _capture(self, ids: torch.Tensor) -> None:
        torch.cuda.synchronize(ids.device)
        torch.cuda.empty_cache()  # the eager steps' cached blocks: the graph gets a pool of its own
        self._ids = ids.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self._stream(ids.device)):
            self._out = tuple(self.step_fn(self._ids))
        self._graph = graph

    @staticmethod
    def _stream(device: torch.device) -> torch.cuda.Stream:
        """The stream the step runs on: above the default priority, which the side streams it forks keep
        (``AdamW(step_in_backward=True)``'s), so that their kernels take the SMs the step's own leave
        free instead of delaying them (a graph's kernels keep the priority of their capture)."""
        return torch.cuda.Stream(device, priority=-1)
