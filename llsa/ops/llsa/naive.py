"""Plain-PyTorch LLSA: the CPU path and the oracle every kernel is tested against.

The attention is organised by *segments*. Segment ``l`` (``0 <= l < L``) holds the level-``l`` children of
the level-``(l+1)`` tokens that the query's level-``(l+1)`` ancestor picked: segment 0 is the fine tokens,
segments ``1..L-1`` are the enriched candidate levels. The last segment, present when ``enrich_levels ==
levels``, is every level-``L`` token. All queries under one level-``(l+1)`` ancestor share segment ``l``,
so its scores are one batched matmul per ancestor: memory stays ``O(N * keys per query)``, never ``N^2``.
"""
import torch
import torch.nn.functional as F

from llsa.ops.llsa.levels import level_sizes, top_smallest_ties
from llsa.ops.llsa.validate import check_qk


def level_counts(n: int, block_size: int, levels: int, device=None) -> list[torch.Tensor]:
    """``c_l(j)``, the number of original tokens under level-l token j, for ``l = 0..levels`` (float64)."""
    counts = [torch.ones(n, dtype=torch.float64, device=device)]
    for _ in range(levels):
        c = counts[-1]
        pad = -c.shape[0] % block_size
        counts.append(F.pad(c, (0, pad)).view(-1, block_size).sum(-1))
    return counts


def pool_levels(x: torch.Tensor, block_size: int, levels: int) -> list[torch.Tensor]:
    """Means of ``x`` (..., N, D) over the original tokens under each level-l token, ``l = 1..levels``.

    Sums are carried from level to level in at least float32 and divided by the true counts, so a
    trailing partial block is the mean of its real tokens. Returned in the accumulation dtype.
    """
    acc = torch.promote_types(x.dtype, torch.float32)
    sums = x.to(acc)
    counts = level_counts(x.shape[-2], block_size, levels, device=x.device)
    pooled = []
    for level in range(1, levels + 1):
        pad = -sums.shape[-2] % block_size
        sums = F.pad(sums, (0, 0, 0, pad))
        # [..., n_l, B, D] -> [..., n_l, D]
        sums = sums.unflatten(-2, (-1, block_size)).sum(-2)
        pooled.append(sums / counts[level].to(acc)[:, None])
    return pooled


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q @ k^T`` over the last dim, as one product-and-sum per pair: identical key rows score bitwise alike,
    which a blocked matrix multiply does not promise (CPU BLAS rounds edge tiles differently), so exact ties
    stay ties and go to the smaller index."""
    return (q[..., :, None, :] * k[..., None, :, :]).sum(-1)


@torch.no_grad()
def select_from_pooled(pq: list[torch.Tensor], pk: list[torch.Tensor], block_size: int,
                       topk: int) -> list[torch.Tensor]:
    """Hierarchical top-K from pooled queries and keys of levels ``1..L`` (lists of (b, h, n_l, D)).

    Returns ``sel`` with ``sel[l-1]`` of shape (b, h, n_l, min(topk, n_l)), int64, ascending: the level-l
    tokens picked by each level-l query token.
    """
    levels = len(pq)
    B = block_size
    n_top = pq[-1].shape[-2]
    scores = _scores(pq[-1], pk[-1])
    cand = torch.arange(n_top, device=scores.device).expand_as(scores)
    sel = [top_smallest_ties(scores, cand, min(topk, n_top))]
    for level in range(levels - 1, 0, -1):
        q_l, k_l = pq[level - 1], pk[level - 1]
        up = sel[0]
        n_l, n_up, kp = q_l.shape[-2], up.shape[-2], up.shape[-1]
        pad = n_up * B - n_l
        # [b, h, n_up, B, D]: sibling query tokens grouped under their parent
        qg = F.pad(q_l, (0, 0, 0, pad)).unflatten(-2, (n_up, B))
        child = (up[..., None] * B + torch.arange(B, device=up.device)).flatten(-2)
        rows = child.clamp(max=n_l - 1).flatten(2)[..., None].expand(-1, -1, -1, k_l.shape[-1])
        # [b, h, n_up, kp*B, D]: children of each parent's picks
        kc = torch.gather(k_l, 2, rows).unflatten(2, (n_up, kp * B))
        s = _scores(qg, kc).masked_fill((child >= n_l)[..., None, :], float("-inf"))
        # [b, h, n_up*B, kp*B]: candidates and scores per level-l query token
        child = child[..., None, :].expand(*child.shape[:-1], B, child.shape[-1]).flatten(2, 3)[:, :, :n_l]
        s = s.flatten(2, 3)[:, :, :n_l]
        sel.insert(0, top_smallest_ties(s, child, min(topk, n_l)))
    return sel


def hierarchical_topk(q: torch.Tensor, k: torch.Tensor, *, block_size: int = 16, topk: int = 8,
                      levels: int | None = None) -> list[torch.Tensor]:
    """The tokens LLSA's selection picks at every level (no gradient).

    Returns a list whose entry ``l-1`` (``l = 1..levels``) has shape ``(batch, heads, ceil(N/B^l),
    min(topk, ceil(N/B^l)))``: for each level-l query token, the indices of the level-l key tokens it
    picked, ascending. Level 1's picks are the fine key blocks every query block attends to.
    """
    levels = check_qk(q, k, block_size=block_size, topk=topk, levels=levels)
    pq = pool_levels(q.detach(), block_size, levels)
    pk = pool_levels(k.detach(), block_size, levels)
    return select_from_pooled(pq, pk, block_size, topk)


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least float32: scores and softmax run there, as in the kernels."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _segment(q_pad, keys, vals, bias, up, block_size, span, n_q, scale):
    """Scores of one candidate segment and a closure that applies probabilities to its values.

    ``up`` (b, h, n_up, kp) are the picks of the level-(l+1) ancestors; each ancestor's ``span`` queries
    attend the B children of each pick, i.e. the (b, h, n_up, kp*B) rows of ``keys`` / ``vals``.
    """
    B = block_size
    n_up, kp = up.shape[-2], up.shape[-1]
    rows = (up[..., None] * B + torch.arange(B, device=up.device)).flatten(-2)
    n_keys = keys.shape[-2]
    valid = rows < n_keys
    rows = rows.clamp(max=n_keys - 1)
    idx = rows[..., None].expand(*rows.shape, keys.shape[-1]).flatten(2, 3)
    # [b, h, n_up, kp*B, D]
    kg = torch.gather(keys, 2, idx).unflatten(2, (n_up, kp * B))
    vg = torch.gather(vals, 2, idx).unflatten(2, (n_up, kp * B))
    bg = bias[rows].masked_fill(~valid, float("-inf"))
    pad = n_up * span - q_pad.shape[-2]
    # [b, h, n_up, span, D]: the queries under each ancestor
    qg = F.pad(q_pad, (0, 0, 0, max(pad, 0)))[:, :, : n_up * span].unflatten(2, (n_up, span))
    s = _up(qg @ kg.transpose(-1, -2)) * scale + _up(bg[..., None, :])

    def apply(p):
        pg = F.pad(p, (0, 0, 0, n_up * span - n_q)).unflatten(2, (n_up, span))
        return (pg.to(vg.dtype) @ vg).flatten(2, 3)[:, :, :n_q]

    return s.flatten(2, 3)[:, :, :n_q], apply


def llsa_attention_torch(q, k, v, *, block_size, topk, levels, enrich_levels, reweight, scale,
                         sel=None, return_lse=False):
    """Reference LLSA forward (autograd gives the backward). Arguments are already validated.

    ``sel`` may carry a precomputed selection (as from ``hierarchical_topk``) so kernel tests can feed
    the same picks to both paths. Returns ``o`` (and the natural-log LSE including the weights).
    """
    B, L, E = block_size, levels, enrich_levels
    n = q.shape[-2]
    dtype = q.dtype
    acc = torch.promote_types(dtype, torch.float32)
    pk_full = pool_levels(k, B, L)
    pv_full = pool_levels(v, B, L)
    if sel is None:
        pq = pool_levels(q.detach(), B, L)
        sel = select_from_pooled(pq, [p.detach() for p in pk_full], B, topk)
    counts = level_counts(n, B, L, device=q.device)
    keys = [k] + [p.to(dtype) for p in pk_full]
    vals = [v] + [p.to(dtype) for p in pv_full]

    def log_weight(level):
        if level == 0 or not reweight:
            return torch.zeros_like(counts[level], dtype=acc)
        return counts[level].log().to(acc)

    n1 = level_sizes(n, B, 1)[1]
    q_pad = F.pad(q, (0, 0, 0, n1 * B - n))
    scores, appliers = [], []
    for level in range(0, min(E, L - 1) + 1):
        span = B ** (level + 1) if sel[level].shape[-2] > 1 else n1 * B
        s, apply = _segment(q_pad, keys[level], vals[level], log_weight(level), sel[level], B, span, n,
                            scale)
        scores.append(s)
        appliers.append(apply)
    if E == L:
        s = _up(q @ keys[L].transpose(-1, -2)) * scale + _up(log_weight(L))
        scores.append(s)
        appliers.append(lambda p: p.to(dtype) @ vals[L])
    widths = [s.shape[-1] for s in scores]
    s_all = torch.cat(scores, dim=-1)
    lse = torch.logsumexp(s_all, dim=-1, keepdim=True)
    p_all = torch.exp(s_all - lse)
    out = sum(apply(p) for apply, p in zip(appliers, p_all.split(widths, dim=-1)))
    out = out.to(dtype)
    return (out, lse.squeeze(-1)) if return_lse else out
