"""A dense LLSA oracle written straight from the semantics in llsa/ops/llsa/README.md, sharing no code with
``llsa``.

Everything runs in float64 with plain loops and dense masks: slow, but each step reads like the spec.
The attention is one dense softmax over the columns [original tokens, level-1 tokens, ..., level-L tokens]
with a weight matrix ``W`` whose entry is the multiplicity of that key in the query's set (0 = absent),
so autograd through it gives the exact dq, dk, dv with the selection held fixed.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch


def oracle_default_levels(n: int, block_size: int) -> int:
    """``max(1, floor(log_B N) - 1)`` with integers only (no float log rounding)."""
    floor_log = 0
    while block_size ** (floor_log + 1) <= n:
        floor_log += 1
    return max(1, floor_log - 1)


def level_spans(n: int, block_size: int, levels: int) -> list[list[tuple[int, int]]]:
    """``spans[l][j]``: the original tokens ``[start, end)`` under level-l token j, for ``l = 0..levels``."""
    spans = []
    for level in range(levels + 1):
        width = block_size ** level
        spans.append([(j * width, min((j + 1) * width, n)) for j in range(math.ceil(n / width))])
    return spans


def pooling_matrices(n: int, block_size: int, levels: int) -> list[torch.Tensor]:
    """``P[l]`` (n_l, N) float64 with ``1 / c_l(j)`` over token j's span: ``P[l] @ x`` is the level-l mean."""
    mats = []
    for spans in level_spans(n, block_size, levels):
        p = torch.zeros(len(spans), n, dtype=torch.float64)
        for j, (start, end) in enumerate(spans):
            p[j, start:end] = 1.0 / (end - start)
        mats.append(p)
    return mats


def top(scores: dict[int, float], k: int) -> list[int]:
    """The ``k`` best candidates by score, ties to the smaller index, returned ascending."""
    ranked = sorted(scores, key=lambda t: (-scores[t], t))
    return sorted(ranked[:k])


def oracle_select(q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int,
                  levels: int) -> tuple[list[list[list[int]]], list[list[list[int]]]]:
    """Hierarchical top-K for one head: q, k (N, D).

    Returns ``(picks, cands)`` indexed ``[l][j]`` for ``l = 1..levels`` (entry 0 unused): the level-l key
    tokens that level-l query token j picked, and the candidates it chose them from.
    """
    n = q.shape[0]
    mats = pooling_matrices(n, block_size, levels)
    # plain dot products of pooled queries and keys, all pairs of one level (no scale); level 0 never selects
    scores = [None] + [((m @ q.double()) @ (m @ k.double()).T).tolist() for m in mats[1:]]
    picks = [None] * (levels + 1)
    cands = [None] * (levels + 1)
    n_top = len(scores[levels])
    cands[levels] = [list(range(n_top)) for _ in range(n_top)]
    for level in range(levels, 0, -1):
        n_l = len(scores[level])
        if level < levels:
            cands[level] = []
            for j in range(n_l):
                parent_picks = picks[level + 1][j // block_size]
                children = [p * block_size + c for p in parent_picks for c in range(block_size)]
                cands[level].append([t for t in children if t < n_l])
        picks[level] = []
        for j in range(n_l):
            row = {t: scores[level][j][t] for t in cands[level][j]}
            picks[level].append(top(row, min(topk, len(row))))
    return picks, cands


def oracle_weights(n: int, block_size: int, levels: int, enrich_levels: int, reweight: bool,
                   picks, cands) -> torch.Tensor:
    """The dense weight matrix ``W`` (N, N + n_1 + ... + n_L) of one head, from the spec's key-set table."""
    spans = level_spans(n, block_size, levels)
    offsets = [0]
    for level in range(levels):
        offsets.append(offsets[-1] + len(spans[level]))
    # built in numpy: element-wise writes into a torch tensor cost microseconds each
    w = np.zeros((n, offsets[-1] + len(spans[levels])))

    def coarse_weight(level, t):
        start, end = spans[level][t]
        return float(end - start) if reweight else 1.0

    for i in range(n):
        # fine keys: the original tokens under the level-1 blocks a_1 picked
        for t in picks[1][i // block_size]:
            start, end = spans[1][t]
            w[i, start:end] += 1.0
        for level in range(1, min(enrich_levels, levels - 1) + 1):
            for t in cands[level][i // block_size ** level]:
                w[i, offsets[level] + t] += coarse_weight(level, t)
        if enrich_levels == levels:
            for t in range(len(spans[levels])):
                w[i, offsets[levels] + t] += coarse_weight(levels, t)
    return torch.from_numpy(w)


@dataclass
class OracleResult:
    out: torch.Tensor
    # natural log of sum_t W_it exp(s_it): the log-sum-exp with the weights inside
    lse: torch.Tensor
    # picks[b][h][l][j] as in ``oracle_select``
    picks: list
    cands: list
    weights: list


def oracle_attention(q, k, v, *, block_size: int, topk: int, levels: int, enrich_levels: int,
                     reweight: bool, scale: float | None = None) -> OracleResult:
    """LLSA output for (batch, heads, N, D) float64 inputs; differentiable in q, k and v."""
    batch, heads, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    mats = pooling_matrices(n, block_size, levels)
    outs, lses, all_picks, all_cands, all_weights = [], [], [], [], []
    for b in range(batch):
        row_out, row_lse, row_picks, row_cands, row_weights = [], [], [], [], []
        for h in range(heads):
            qh, kh, vh = q[b, h], k[b, h], v[b, h]
            picks, cands = oracle_select(qh.detach(), kh.detach(), block_size, topk, levels)
            w = oracle_weights(n, block_size, levels, enrich_levels, reweight, picks, cands)
            # every level's tokens side by side; mats[0] is the identity, so column t < N is token t itself
            keys = torch.cat([m @ kh for m in mats])
            vals = torch.cat([m @ vh for m in mats])
            s = scale * (qh @ keys.T)
            present = w > 0
            s = torch.where(present, s, torch.full_like(s, -math.inf))
            m = s.max(dim=-1, keepdim=True).values.detach()
            e = w * torch.exp(s - m)
            z = e.sum(dim=-1, keepdim=True)
            row_out.append((e @ vals) / z)
            row_lse.append((z.log() + m).squeeze(-1))
            row_picks.append(picks)
            row_cands.append(cands)
            row_weights.append(w)
        outs.append(torch.stack(row_out))
        lses.append(torch.stack(row_lse))
        all_picks.append(row_picks)
        all_cands.append(row_cands)
        all_weights.append(row_weights)
    return OracleResult(torch.stack(outs), torch.stack(lses), all_picks, all_cands, all_weights)
