"""Next-token cross-entropy of an LM head without the ``[T, V]`` logits: chunked, gradients in forward.

``lm_head_cross_entropy(x_TD, w_VD, targets_T)`` equals
``F.cross_entropy((x_TD @ w_VD.T).float(), targets_T)`` (mean over T) in value and in the gradients of
``x`` and ``w``, but holds one ``[C, V]`` chunk of fp32 logits at a time instead of the whole
``[T, V]`` logits, their fp32 copy and their gradient (~2.6 GB at T 8192, V 32000). The loss is a
scalar, so its gradient is known up to the incoming scale while the chunk is live: forward computes
``grad_x`` and ``grad_w`` chunk by chunk (``grad_w`` summed in fp32), backward only scales them. On
GPUs the per-chunk softmax/gradient pass is compiled (one kernel); the GEMMs are cuBLAS's.

Legend: T tokens, D model dim, V vocabulary, C tokens per chunk.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from flashfusemoe.spec import check_int

__all__ = ["lm_head_cross_entropy"]

CHUNK = 2048


def _add_mm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` for an fp32 ``acc`` (CUDA 16-bit: in the GEMM's epilogue, the product never
    rounded to 16 bits nor written out and read back: seed-1b's 4 chunks x 131 MB of fp32 adds)."""
    if a.is_cuda and a.dtype != torch.float32:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += (a @ b).float()


def _chunk_loss_and_grad_(logits_CV: torch.Tensor, targets_C: torch.Tensor, inv_T: torch.Tensor):
    """Summed CE of one chunk (fp32); overwrites the logits with their gradient ``(softmax - onehot) *
    inv_T`` (the d(mean CE)/d logits of the whole call, rounded once as autograd would): the chunk's
    gradient takes no buffer of its own (seed-1b: 131 MB at the step's peak)."""
    z_CV = logits_CV.float()
    lse_C = torch.logsumexp(z_CV, dim=1)
    loss = (lse_C - z_CV.gather(1, targets_C[:, None])[:, 0]).sum()
    p_CV = (z_CV - lse_C[:, None]).exp()
    hit_CV = torch.arange(z_CV.shape[1], device=z_CV.device) == targets_C[:, None]
    logits_CV.copy_((p_CV - hit_CV.float()) * inv_T)
    return loss


@functools.cache
def _compiled_chunk():
    """On GPUs: one fused pass over the chunk's logits instead of ~6 eager ones (~3 ms a step at seed-1b),
    writing the gradient where it read the logits."""
    return torch.compile(_chunk_loss_and_grad_, dynamic=False)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, w_VD: torch.Tensor, targets_T: torch.Tensor, chunk: int):
        T = x_TD.shape[0]
        chunk_fn = _compiled_chunk() if x_TD.is_cuda else _chunk_loss_and_grad_
        inv_T = torch.full((), 1.0 / max(T, 1), device=x_TD.device)  # a tensor: no recompile per T
        loss = x_TD.new_zeros((), dtype=torch.float32)
        grad_x_TD = torch.empty_like(x_TD)
        grad_w_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device)
        for start in range(0, T, chunk):
            x_CD, tgt_C = x_TD[start : start + chunk], targets_T[start : start + chunk]
            grad_CV = x_CD @ w_VD.t()  # the logits, then (in place) their gradient
            loss = loss + chunk_fn(grad_CV, tgt_C, inv_T)
            grad_x_TD[start : start + chunk] = grad_CV @ w_VD
            _add_mm_fp32_(grad_w_VD, grad_CV.t(), x_CD)
            del grad_CV  # not alive beside the next chunk's (seed-1b: 131 MB at the step's peak)
        ctx.save_for_backward(grad_x_TD, grad_w_VD.to(w_VD.dtype))
        return loss / max(T, 1)

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x_TD, grad_w_VD = ctx.saved_tensors
        scale = grad_loss.to(grad_x_TD.dtype)
        return grad_x_TD * scale, grad_w_VD * scale, None, None


def lm_head_cross_entropy(
    x_TD: torch.Tensor, w_VD: torch.Tensor, targets_T: torch.Tensor, chunk: int = CHUNK
) -> torch.Tensor:
    """Mean next-token cross-entropy of logits ``x_TD @ w_VD.T`` (computed in fp32) against
    ``targets_T`` (int64 in ``[0, V)``); an fp32 scalar (0 for T = 0), differentiable in ``x`` and
    ``w``. Without a backward to come (no_grad, or neither needs a gradient) only the loss is computed."""
    if x_TD.dim() != 2 or w_VD.dim() != 2 or x_TD.shape[1] != w_VD.shape[1]:
        raise ValueError(f"x must be [T, D] and w [V, D], got {tuple(x_TD.shape)} and {tuple(w_VD.shape)}")
    check_int("chunk", chunk, 1)
    if targets_T.shape != x_TD.shape[:1]:
        raise ValueError(f"targets must be [T={x_TD.shape[0]}], got {tuple(targets_T.shape)}")
    if not (torch.is_grad_enabled() and (x_TD.requires_grad or w_VD.requires_grad)):
        # no backward to come: the loss alone, chunk by chunk, without the gradient GEMMs
        T, loss = x_TD.shape[0], x_TD.new_zeros((), dtype=torch.float32)
        for s in range(0, T, chunk):
            logits_CV = (x_TD[s : s + chunk] @ w_VD.t()).float()
            loss = loss + F.cross_entropy(logits_CV, targets_T[s : s + chunk], reduction="sum")
        return loss / max(T, 1)
    return _HeadCrossEntropy.apply(x_TD, w_VD, targets_T, chunk)
