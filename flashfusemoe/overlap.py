"""Overlap of expert-parallel communication with compute: the one module that owns streams and events.

The schedule, when it applies (CUDA tensors, a communicator of W > 1 ranks, shared experts to run):

forward: routing -> ``begin()`` records an event A on the compute stream -> the shared experts are
    launched on the compute stream -> ``dispatch`` runs on a side stream that waits for A only, so the
    dispatch all-to-all (and its host wait for the split sizes) proceeds while the shared experts
    compute -> the compute stream waits for the dispatch -> routed experts -> combine.
backward: autograd runs every op's backward on the stream its forward ran on, so dispatch's backward
    (a combine of the row and weight gradients) runs on the side stream; the shared experts were
    recorded before the dispatch, so the engine launches their backward right after it, and they
    compute while the gradients travel. The router and latent backwards wait for those gradients.

A communicator's own stream hangs off the side stream: DeepEP's kernels run on its communication
stream behind an event of the current (side) stream (its ``previous_event``), and NCCL's on its
internal stream behind the current one; the compute stream waits once, where it needs the rows.

Overlap moves no data and changes no arithmetic: the same kernels run on the same inputs, only on two
streams, so its results equal the serial schedule's bit for bit (tested). Elsewhere (CPU, loopback,
no shared experts: nothing to overlap) the layer runs the serial schedule; on CPU the overlapped order
runs without streams (``begin`` returns None: dispatch inline), which is how CI checks it.

Legend: T tokens, K top-k, D row width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from flashfusemoe.comm import Communicator, Dispatched

__all__ = ["applies", "begin", "dispatch"]

_SIDE_STREAMS: dict[int, torch.cuda.Stream] = {}  # one side stream per device, made on first use


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


def applies(communicator: Communicator, has_shared: bool, enabled: bool) -> bool:
    """Whether the layer runs the overlapped schedule: asked for, shared experts to overlap with, and a
    communicator of more than one rank (the order of the work changes even on CPU; streams need CUDA)."""
    return enabled and has_shared and communicator.world_size > 1


@torch.compiler.disable  # stream and event handling stays eager, beside the eager dispatch
def begin(x_TD: torch.Tensor) -> torch.cuda.Event | None:
    """The event that a later ``dispatch`` starts behind, recorded now on the compute stream (None for
    CPU tensors: no streams, dispatch runs inline)."""
    if not x_TD.is_cuda:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(x_TD.device))
    return event


def _tensors(obj: object) -> Iterator[torch.Tensor]:
    """Every tensor in a Dispatched: its fields and the ones its handle (a dataclass) holds."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for field in dataclasses.fields(obj):
            yield from _tensors(getattr(obj, field.name))


def dispatch(
    communicator: Communicator,
    after: torch.cuda.Event | None,
    x_TD: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    *,
    num_experts: int,
) -> Dispatched:
    """``communicator.dispatch`` on the side stream, behind ``after`` (from :func:`begin`); the compute
    stream waits for it before this returns (on the device, not the host). ``after`` None: inline (and
    traceable: loopback's dispatch compiles into the graph)."""
    if after is None:
        return communicator.dispatch(x_TD, topk_ids_TK, topk_weights_TK, num_experts=num_experts)
    return _dispatch_on_side(communicator, after, x_TD, topk_ids_TK, topk_weights_TK, num_experts)


@torch.compiler.disable
def _dispatch_on_side(communicator, after, x_TD, topk_ids_TK, topk_weights_TK, num_experts) -> Dispatched:
    compute, side = torch.cuda.current_stream(x_TD.device), _side_stream(x_TD.device)
    side.wait_event(after)
    with torch.cuda.stream(side):
        recv = communicator.dispatch(x_TD, topk_ids_TK, topk_weights_TK, num_experts=num_experts)
    compute.wait_stream(side)
    # The caching allocator ties a block to the stream it was made on: mark the inputs as used by the
    # side stream and the outputs as used by the compute stream, so neither is reused too early.
    for t in (x_TD, topk_ids_TK, topk_weights_TK):
        t.record_stream(side)
    for t in _tensors(recv):
        if t.is_cuda:
            t.record_stream(compute)
    return recv
