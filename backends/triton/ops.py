"""``custom_op``: a ``torch.library`` custom op that torch.compile sees as one opaque node, and that eager
mode calls as the plain Python function it wraps.

torch.compile needs the op (a fake implementation gives it static output shapes, so routing changes never
recompile and nothing data-dependent is traced); eager mode gains nothing from the dispatcher round trip,
which cost about 30 us of host time per call on a lent H100 host (a layer step makes six such calls).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["custom_op"]


def custom_op(name: str, fake: Callable, mutates: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as ``flashfusemoe::<name>`` (mutating the arguments named in
    ``mutates``) with ``fake`` as its fake implementation; the returned callable runs the op while
    torch.compile traces, ``fn`` otherwise."""

    def wrap(fn: Callable) -> Callable:
        op = torch.library.custom_op(f"flashfusemoe::{name}", mutates_args=mutates)(fn)
        op.register_fake(fake)

        def call(*args):
            return op(*args) if torch.compiler.is_compiling() else fn(*args)

        call.__doc__ = fn.__doc__
        return call

    return wrap
