"""Dense-gradient sync over the EP group, overlapped with backward: ``OverlappedGradSync``,
``get_dense_params`` and ``get_expert_params``.

Under expert parallelism every rank holds all replicated ("dense") parameters — attention, norms, the
router, shared experts — and its own block of experts. The dense gradients must be averaged over the
EP group; the expert gradients must not (each expert lives on one rank and already sums the gradient
contributions of every rank's tokens).

Legend: W EP world size, B buckets.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from flashfusemoe.comm import all_reduce_sum, group_size
from flashfusemoe.layer import MoELayer
from flashfusemoe.spec import check_int

__all__ = ["OverlappedGradSync", "get_dense_params", "get_expert_params"]


def get_expert_params(model: nn.Module) -> list[nn.Parameter]:
    """The expert parameters (``w_up``, ``w_down``) of every ``MoELayer`` in ``model``."""
    return [p for m in model.modules() if isinstance(m, MoELayer) for p in m.expert_parameters()]


def get_dense_params(model: nn.Module, backward_order: bool = True) -> list[nn.Parameter]:
    """The trainable parameters of ``model`` that are replicated over the EP group (all but the
    experts'), each once. ``backward_order``: reversed registration order, the order in which a
    backward through a model built front to back reaches them (the heuristic DDP starts from), so
    that the first buckets of :class:`OverlappedGradSync` fill first."""
    experts = {id(p) for p in get_expert_params(model)}
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in experts]
    return dense[::-1] if backward_order else dense


class OverlappedGradSync:
    """Average the gradients of ``dense_params`` over ``ep_group`` while backward still runs.

    The parameters are cut, in the order given (use :func:`get_dense_params`), into ``num_buckets``
    consecutive buckets of about equal size (one dtype each). A post-accumulate-grad hook on every
    parameter notes its gradient; once every gradient of a bucket is in, the bucket's gradients are
    copied into one flat buffer and all-reduced asynchronously (sum, over ``ep_group``: a
    torch.distributed group, a ``FakeGroup`` or None for the default group); buckets are launched in
    index order on every rank, so the collectives match. :meth:`finish` waits for them, launching the
    buckets whose gradients never came (a parameter unused in this step counts as zeros), and writes
    each mean back into ``.grad``: after it every rank holds the same dense gradients.

    Gradient accumulation: run the micro-batches before the last one under ``with sync.no_sync():``
    (their gradients only accumulate locally), then the last one without it, then ``finish()``.

    ``expert_params`` (e.g. :func:`get_expert_params`): never all-reduced; ``finish()`` scales their
    gradients by ``1 / divide_by``. Pass them when each rank's loss is a mean over its own tokens: an
    expert then sums W ranks' contributions, W times the gradient of the mean loss over the global batch.
    The triton backend's in-place ``.grad`` additions (gradient accumulation) run before these hooks.

    ``divide_by``: what the summed gradients are divided by (default: the group's size W, the mean).
    Expert parallelism inside data parallelism (EP groups of size W_ep, their D replicas) takes two
    syncs: the dense parameters over every rank (the mean), and the expert parameters over the D ranks
    that hold the same experts, divided by all D * W_ep ranks
    (``OverlappedGradSync(get_expert_params(model), replica_group, divide_by=D * W_ep)``).
    """

    def __init__(
        self,
        dense_params: Sequence[nn.Parameter],
        ep_group: object | None = None,
        num_buckets: int = 4,
        expert_params: Sequence[nn.Parameter] | None = None,
        divide_by: int | None = None,
    ) -> None:
        check_int("num_buckets", num_buckets, 1)
        params = list(dense_params)
        if not all(isinstance(p, torch.Tensor) and p.requires_grad for p in params):
            raise TypeError("dense_params must be parameters that require grad (get_dense_params(model))")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("dense_params lists a parameter twice")
        experts = list(expert_params or [])
        if {id(p) for p in experts} & {id(p) for p in params}:
            raise ValueError("a parameter is in both dense_params and expert_params")
        self.group, self.world_size = ep_group, group_size(ep_group)
        self.divide_by = self.world_size if divide_by is None else check_int("divide_by", divide_by, 1)
        self.expert_params = experts
        self.buckets = self._cut(params, num_buckets)
        self._bucket_of = {id(p): b for b, bucket in enumerate(self.buckets) for p in bucket}
        self._syncing = True
        self._reset()
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in params]

    @staticmethod
    def _cut(params: list[nn.Parameter], num_buckets: int) -> list[list[nn.Parameter]]:
        """Consecutive buckets of about ``total / num_buckets`` elements, split where the dtype changes."""
        target = max(1, sum(p.numel() for p in params) // num_buckets)
        buckets: list[list[nn.Parameter]] = []
        size = 0
        for p in params:
            if not buckets or size >= target or buckets[-1][0].dtype != p.dtype:
                buckets.append([])
                size = 0
            buckets[-1].append(p)
            size += p.numel()
        return buckets

    def _reset(self) -> None:
        self._arrived = [0] * len(self.buckets)
        self._pending: list[tuple[torch.Tensor, object]] = []  # (flat buffer, work) by bucket, in order

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Micro-batches whose gradients only accumulate locally (all but the last of a step)."""
        self._syncing = False
        try:
            yield
        finally:
            self._syncing = True

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self._syncing:
            return
        b = self._bucket_of[id(p)]
        self._arrived[b] += 1
        # launch, in index order, every bucket whose gradients are all in
        while len(self._pending) < len(self.buckets) and self._arrived[len(self._pending)] == len(
            self.buckets[len(self._pending)]
        ):
            self._launch(len(self._pending))

    def _launch(self, b: int) -> None:
        bucket = self.buckets[b]
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket]
        )
        self._pending.append((flat, all_reduce_sum(flat, self.group, f"grad sync bucket {b}", async_op=True)))

    def finish(self) -> None:
        """Wait for every bucket (launching those still open), write the means into ``.grad`` and
        scale the expert gradients; then ready for the next step."""
        while len(self._pending) < len(self.buckets):
            self._launch(len(self._pending))
        inv_W = 1.0 / self.divide_by
        for bucket, (flat, work) in zip(self.buckets, self._pending, strict=True):
            work.wait()
            flat.mul_(inv_W)
            offset = 0
            for p in bucket:
                mean = flat[offset : offset + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = mean.clone()
                else:
                    p.grad.copy_(mean)
                offset += p.numel()
        with torch.no_grad():
            for p in self.expert_params:
                if p.grad is not None:
                    p.grad.mul_(inv_W)
        self._reset()

    def remove(self) -> None:
        """Remove the hooks (the parameters' gradients are left as they are)."""
        for h in self._handles:
            h.remove()
        self._handles = []
