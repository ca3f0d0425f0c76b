"""Plain-PyTorch pieces shared by the VSA and SLA references: pooling, top-K block selection and
gather-based block-sparse attention. Memory stays O(N * K * B); no N x N tensor is formed."""
import torch
import torch.nn.functional as F


def num_blocks(n: int, block_size: int) -> int:
    return -(-n // block_size)


def block_mean(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Mean of ``x`` (..., N, D) over each block of ``block_size`` rows, in at least float32.

    A trailing partial block is the mean of its real rows. Differentiable.
    """
    n = x.shape[-2]
    nb = num_blocks(n, block_size)
    acc = torch.promote_types(x.dtype, torch.float32)
    # [..., nb, B, D] -> [..., nb, D]
    sums = F.pad(x.to(acc), (0, 0, 0, nb * block_size - n)).unflatten(-2, (nb, block_size)).sum(-2)
    counts = torch.full((nb, 1), float(block_size), dtype=acc, device=x.device)
    counts[-1] = n - (nb - 1) * block_size
    return sums / counts


def block_broadcast(x: torch.Tensor, block_size: int, n: int) -> torch.Tensor:
    """Copy each block's row of ``x`` (..., nb, D) to its ``block_size`` tokens: (..., n, D)."""
    return x.repeat_interleave(block_size, dim=-2)[..., :n, :]


def _ordered_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys whose order is (float32 score, then smaller column first): the float's bits, with the
    magnitude bits of negatives flipped so signed integer order is float order, above the reversed column."""
    # adding +0.0 turns -0.0 into +0.0, so the two zeros tie as they do in float comparison
    bits = (scores + 0.0).contiguous().view(torch.int32)
    mono = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    n_k = scores.shape[-1]
    reversed_col = n_k - 1 - torch.arange(n_k, device=scores.device)
    return (mono << 32) | reversed_col


@torch.no_grad()
def topk_blocks(scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Per row of ``scores`` (..., n_q, n_k), the ``min(topk, n_k)`` highest columns, ascending, int64.

    Ties go to the smaller index. float32 scores go through ``torch.topk`` on keys that encode the
    tie-break (a selection, far cheaper than sorting every row); other dtypes use a stable descending
    sort, which keeps equal scores in index order.
    """
    k = min(topk, scores.shape[-1])
    if scores.dtype == torch.float32:
        order = torch.topk(_ordered_keys(scores), k, dim=-1, sorted=False).indices
    else:
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return order.sort(dim=-1).values


def gather_blocks(x: torch.Tensor, idx: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the picked blocks: ``x`` (b, h, N, D), ``idx`` (b, h, n_q, K) -> (b, h, n_q, K*B, D) and
    the (b, h, n_q, K*B) mask of real rows (padded slots of a partial block are False)."""
    n, d = x.shape[-2:]
    rows = (idx[..., None] * block_size + torch.arange(block_size, device=idx.device)).flatten(-2)
    valid = rows < n
    rows = rows.clamp(max=n - 1)
    g = torch.gather(x, 2, rows.flatten(2)[..., None].expand(-1, -1, -1, d))
    return g.unflatten(2, rows.shape[2:]), valid


def query_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(b, h, N, D) -> (b, h, n_q, B, D), the partial last block zero-padded."""
    n = x.shape[-2]
    return F.pad(x, (0, 0, 0, num_blocks(n, block_size) * block_size - n)).unflatten(2, (-1, block_size))


def block_sparse_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, *,
                                 block_size: int, scale: float) -> torch.Tensor:
    """Exact softmax attention of each query block over the tokens of its picked key blocks.

    Products run in the input dtype, the softmax in at least float32 (as in the kernels); returns q's dtype.
    """
    n = q.shape[-2]
    kg, valid = gather_blocks(k, idx, block_size)
    vg, _ = gather_blocks(v, idx, block_size)
    qg = query_blocks(q, block_size)
    acc = torch.promote_types(q.dtype, torch.float32)
    # [b, h, n_q, B, K*B]
    s = (qg @ kg.transpose(-1, -2)).to(acc) * scale
    p = torch.softmax(s.masked_fill(~valid[..., None, :], float("-inf")), dim=-1)
    o = (p.to(vg.dtype) @ vg).flatten(2, 3)[:, :, :n]
    return o.to(q.dtype)
