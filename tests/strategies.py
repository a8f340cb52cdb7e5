"""Hypothesis strategies and the tensor builders that go with them.

Strategies draw small integers and a seed; tensors are built from them with a torch Generator, so
examples shrink well. Legend: T tokens, D model dim, E experts, K top-k, I intermediate dim, W ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

SKEWS = ("uniform", "one_hot_expert", "few_experts")


@dataclass(frozen=True)
class Problem:
    T: int
    D: int
    E: int
    K: int
    I: int
    W: int
    skew: str
    seed: int

    def gen(self, salt: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 7919 + salt)


@st.composite
def problems(draw, max_world: int = 4, max_tokens: int = 12, allow_empty: bool = True) -> Problem:
    W = draw(st.integers(1, max_world))
    E = W * draw(st.integers(1, 3))
    K = draw(st.integers(1, E))
    return Problem(
        T=draw(st.integers(0 if allow_empty else 1, max_tokens)),
        D=draw(st.integers(1, 12)),
        E=E,
        K=K,
        I=draw(st.integers(1, 8)),
        W=W,
        skew=draw(st.sampled_from(SKEWS)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@st.composite
def ep_problems(draw, max_world: int = 4, max_local: int = 16, max_tokens: int = 40) -> Problem:
    """Expert-parallel problems: W in 1..max_world dividing E <= W*max_local (64 by default), K in
    1..E, T in 0..max_tokens (T*K beyond the metadata kernel's 64-slot block)."""
    W = draw(st.integers(1, max_world))
    E = W * draw(st.integers(1, max_local))
    return Problem(
        T=draw(st.integers(0, max_tokens)),
        D=draw(st.integers(1, 12)),
        E=E,
        K=draw(st.integers(1, E)),
        I=draw(st.integers(1, 8)),
        W=W,
        skew=draw(st.sampled_from(SKEWS)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def rank_tokens(p: Problem, rank: int) -> int:
    """Tokens of rank ``rank``: rank 0 has p.T (0 allowed), the others differ from it and each other."""
    return p.T if rank == 0 else (p.T + 7 * rank) % 41


def skew_bias(p: Problem) -> torch.Tensor:
    """A selection bias ``[E]`` that realizes the problem's skew (zeros for uniform routing)."""
    bias_E = torch.zeros(p.E)
    if p.skew == "one_hot_expert":
        bias_E[torch.randint(p.E, (1,), generator=p.gen(1))] = 10.0
    elif p.skew == "few_experts":
        bias_E[torch.randperm(p.E, generator=p.gen(2))[: max(1, p.K)]] = 10.0
    return bias_E


def topk_ids(p: Problem, T: int | None = None, salt: int = 0, drop_frac: float = 0.0) -> torch.Tensor:
    """Distinct expert ids per token ``[T, K]`` with the problem's skew; a ``drop_frac`` of slots -1."""
    T = p.T if T is None else T
    g = p.gen(10 + salt)
    scores_TE = torch.rand(T, p.E, generator=g) + skew_bias(p)
    ids_TK = scores_TE.topk(p.K, dim=-1).indices
    if drop_frac:
        ids_TK = torch.where(torch.rand(T, p.K, generator=g) < drop_frac, -1, ids_TK)
    return ids_TK


def randn(p: Problem, *shape: int, salt: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=p.gen(100 + salt)).to(dtype)
