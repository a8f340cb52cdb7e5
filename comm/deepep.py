"""``deepep``: DeepEP's normal (high-throughput) dispatch and combine kernels, ``deep_ep.Buffer`` v1 API.

DeepEP's semantics are this package's contract (comm/base.py): one row per (token, destination rank),
local expert ids with -1 for experts elsewhere, combine summing a token's rows over ranks. Dispatch
runs ``get_dispatch_layout`` + ``dispatch`` (one host wait, inside DeepEP, for the received count);
its backward is a ``combine`` of the row gradients with the weight gradients as ``topk_weights``;
combine's backward is a cached ``dispatch`` replayed from DeepEP's handle. DeepEP moves bf16 rows only.

``deep_ep`` is imported when a communicator is built, never by ``import flashfusemoe``. Install: the
prebuilt wheel ``pip install tokenspeed-deepep==1.2.1.post20251110`` (cp312, CUDA 13, NVSHMEM 3; import
name ``deep_ep``; its 2.x wheels need NCCL >= 2.29), or build https://github.com/deepseek-ai/DeepEP
from source (it needs NVSHMEM).

Legend: T tokens, K top-k, E experts, D model dim, R rows received, W EP world size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from flashfusemoe.comm.base import Communicator, Dispatched
from flashfusemoe.comm.loopback import loopback_when_alone
from flashfusemoe.spec import check_first_order, check_int

__all__ = ["DeepEPCommunicator", "DeepEPHandle"]

INSTALL_HINT = (
    "communicator 'deepep' needs DeepEP (import name deep_ep): pip install "
    "tokenspeed-deepep==1.2.1.post20251110 (cp312, CUDA 13, NVSHMEM 3), or build "
    "https://github.com/deepseek-ai/DeepEP from source"
)


def _import_deep_ep():
    try:
        import deep_ep
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
    return deep_ep


@dataclass(frozen=True)
class DeepEPHandle:
    """Attributes: ``num_tokens`` (T), ``num_recv`` (R), ``buffer`` (the ``deep_ep.Buffer``), ``layout``
    (DeepEP's own handle: prefix matrices and source indices, replayed by combine and the backwards)."""

    num_tokens: int
    num_recv: int
    buffer: Any
    layout: tuple


# One Buffer per process group, reused by every layer and step; rebuilt larger when a wider row comes.
_BUFFERS: dict[int, tuple[Any, int]] = {}


class DeepEPCommunicator(Communicator):
    """EP over DeepEP's NVLink (intranode) / RDMA (internode) kernels, on a torch.distributed group
    (None: the default group). ``num_sms``: the SMs DeepEP's kernels take (even; DeepEP's default
    20). ``num_nvl_bytes`` / ``num_rdma_bytes``: buffer sizes; None sizes them from DeepEP's config
    hints for the widest row dispatched so far. A group of one rank moves nothing: dispatch and
    combine are then loopback's (no Buffer is made)."""

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        num_sms: int | None = None,
        num_nvl_bytes: int | None = None,
        num_rdma_bytes: int | None = None,
    ) -> None:
        self.deep_ep = _import_deep_ep()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "communicator 'deepep' needs torch.distributed initialized (init_process_group)"
            )
        if group is not None and not isinstance(group, dist.ProcessGroup):
            raise TypeError(
                f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}"
            )
        self.group = group if group is not None else dist.group.WORLD
        self.rank, self.world_size = dist.get_rank(self.group), dist.get_world_size(self.group)
        if num_sms is not None:
            check_int("num_sms", num_sms, 2)
            if num_sms % 2:
                raise ValueError(f"num_sms={num_sms} must be even (DeepEP's kernels pair SMs)")
            self.deep_ep.Buffer.set_num_sms(num_sms)
        for name, value in (("num_nvl_bytes", num_nvl_bytes), ("num_rdma_bytes", num_rdma_bytes)):
            if value is not None:
                check_int(name, value, 0)
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes

    def _buffer(self, hidden_bytes: int):
        """The group's Buffer, big enough for rows of ``hidden_bytes`` (DeepEP's own size hints)."""
        Buffer, W = self.deep_ep.Buffer, self.world_size
        configs = (Buffer.get_dispatch_config(W), Buffer.get_combine_config(W))
        nvl = self.num_nvl_bytes
        if nvl is None:
            nvl = max(c.get_nvl_buffer_size_hint(hidden_bytes, W) for c in configs)
        rdma = self.num_rdma_bytes
        if rdma is None:
            rdma = max(c.get_rdma_buffer_size_hint(hidden_bytes, W) for c in configs) if W > 8 else 0
        key = id(self.group)
        cached = _BUFFERS.get(key)
        if cached is None or cached[1] < hidden_bytes:  # every rank sees the same rows: all rebuild together
            _BUFFERS[key] = (Buffer(self.group, num_nvl_bytes=nvl, num_rdma_bytes=rdma), hidden_bytes)
        return _BUFFERS[key][0]

    @loopback_when_alone
    @torch.compiler.disable  # host reads and collectives: kept out of compiled graphs, run eagerly
    def dispatch(
        self,
        x_TD: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        *,
        num_experts: int,
    ) -> Dispatched:
        self.check_dispatch_args(x_TD, topk_ids_TK, topk_weights_TK, num_experts)
        if x_TD.dtype != torch.bfloat16 or not x_TD.is_cuda:
            raise TypeError(
                f"communicator 'deepep' moves CUDA bf16 rows only, got {x_TD.dtype} on {x_TD.device}: run "
                "the layer in bf16, or use communicator 'nccl'"
            )
        buffer = self._buffer(x_TD.shape[1] * x_TD.element_size())
        recv_x, recv_ids, recv_w, layout, num_slots = _Dispatch.apply(
            buffer, num_experts, x_TD, topk_ids_TK.to(torch.int64), topk_weights_TK.float()
        )
        handle = DeepEPHandle(x_TD.shape[0], recv_x.shape[0], buffer, layout)
        return Dispatched(recv_x, recv_ids.to(topk_ids_TK.dtype), recv_w, handle, num_slots)

    @loopback_when_alone
    @torch.compiler.disable
    def combine(self, y_RD: torch.Tensor, handle: DeepEPHandle) -> torch.Tensor:
        self.check_combine_args(y_RD, handle, DeepEPHandle)
        return _Combine.apply(handle.buffer, handle.layout, y_RD.contiguous())


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buffer, num_experts, x_TD, ids_TK, weights_TK):
        per_rank, per_rdma_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(ids_TK, num_experts)
        recv_x, recv_ids, recv_w, per_local_expert, layout, _ = buffer.dispatch(
            x_TD.contiguous(),
            topk_idx=ids_TK.contiguous(),
            topk_weights=weights_TK.contiguous(),
            num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank,
            is_token_in_rank=in_rank,
            num_tokens_per_expert=per_expert,
        )
        recv_w = torch.where(recv_ids >= 0, recv_w, 0.0)  # the contract: weight 0 where the id is -1
        ctx.buffer, ctx.layout = buffer, layout
        ctx.mark_non_differentiable(recv_ids)
        return recv_x, recv_ids, recv_w, layout, sum(per_local_expert)

    @staticmethod
    def backward(ctx, grad_x_RD, _ids, grad_w_RK, _layout, _slots):
        """A combine: row gradients summed per token over ranks; weight gradients through combine's
        ``topk_weights`` (each slot's is non-zero on the one rank that holds its expert)."""
        check_first_order("expert-parallel dispatch (deepep)")
        grad_x_TD, grad_w_TK, _ = ctx.buffer.combine(
            grad_x_RD.contiguous(), ctx.layout, topk_weights=grad_w_RK.float().contiguous()
        )
        return None, None, grad_x_TD, None, grad_w_TK


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buffer, layout, y_RD):
        ctx.buffer, ctx.layout = buffer, layout
        out_TD, _, _ = buffer.combine(y_RD, layout)
        return out_TD

    @staticmethod
    def backward(ctx, grad_out_TD):
        """A dispatch of the output gradient, replayed from DeepEP's handle (cached mode)."""
        check_first_order("expert-parallel combine (deepep)")
        grad_RD, *_ = ctx.buffer.dispatch(grad_out_TD.contiguous(), handle=ctx.layout)
        return None, None, grad_RD
