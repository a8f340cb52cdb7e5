"""``custom_op``: a ``torch.library`` custom op that torch.compile sees as one opaque node, and that eager
mode calls as the plain Python function it wraps.

torch.compile needs the op (a fake implementation gives it static output shapes, so routing changes never
recompile and nothing data-dependent is traced); eager mode gains nothing from the dispatcher round trip,
which cost about 30 us of host time per call on a lent H100 host (a layer step makes six such calls),
except under a dispatch mode (``FlopCounterMode``, a debug mode), which then sees the op as one call.

An op's GEMM FLOPs are registered with ``torch.utils.flop_counter``: ``FlopCounterMode`` counts them, and
torch.compile's activation memory budget (``torch._functorch.config.activation_memory_budget``) ranks
what to recompute by them; an op it counted as 0 FLOPs would look free to recompute.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import register_flop_formula

__all__ = ["as_op", "custom_op"]


def as_op() -> bool:
    """Whether ``custom_op`` callables run as ops now (torch.compile traces, or a dispatch mode is
    active): their outputs may then not alias their inputs."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def custom_op(
    name: str, fake: Callable, mutates: tuple[str, ...] = (), flops: Callable[..., int] | None = None
) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as ``flashfusemoe::<name>`` (mutating the arguments named in
    ``mutates``) with ``fake`` as its fake implementation and ``flops`` (called with the op's
    arguments, tensors as their shapes) as its FLOP count; the returned callable runs the op while
    torch.compile traces or a dispatch mode is active, ``fn`` otherwise."""

    def wrap(fn: Callable) -> Callable:
        op = torch.library.custom_op(f"flashfusemoe::{name}", mutates_args=mutates)(fn)
        op.register_fake(fake)
        if flops is not None:
            register_flop_formula(getattr(torch.ops.flashfusemoe, name))(
                lambda *args, out_val=None, **kwargs: flops(*args)
            )

        def call(*args):
            return op(*args) if as_op() else fn(*args)

        call.__doc__ = fn.__doc__
        return call

    return wrap
