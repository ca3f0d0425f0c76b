"""What LLSA's selection gives a query pixel of a DiT, in pixels, and a picture of it.

A DiT's attention sees a sequence of patch tokens, in row-major order or, with ``reorder``, in the
locality order of :mod:`llsa.reorder`; :func:`token_cells` maps sequence positions back to patches.
:func:`capture_qk` records the q and k one attention layer is called with, :func:`key_sets` turns
``hierarchical_topk``'s picks into the tokens of each level in one query's key set (the segments of
``llsa/ops/llsa/README.md``), and :func:`draw_picks` draws them over the image (matplotlib).
"""
import contextlib
from dataclasses import dataclass, field

import numpy as np
import torch

from llsa.ops.llsa import hierarchical_topk
from llsa.ops.llsa.levels import default_levels, level_sizes
from llsa.reorder import locality_order

# fine picks, then the picks and attended tokens of levels 2, 3, ...
LEVEL_COLOURS = ("#d62728", "#ff7f0e", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b")
QUERY_COLOUR = "#00e5ff"
COARSEST_COLOUR = "#ffffff"


def token_cells(grid: tuple[int, int], reorder: bool) -> torch.Tensor:
    """(N, 2) int64: the (row, column) patch, on a ``grid`` of (rows, columns) patches, of each position of
    the token sequence a DiT's attention sees (``reorder``: the DiT's locality order)."""
    rows, cols = grid
    index = locality_order((rows, cols))[0] if reorder else torch.arange(rows * cols)
    return torch.stack([index // cols, index % cols], dim=1)


def sequence_position(cell: tuple[int, int], grid: tuple[int, int], reorder: bool) -> int:
    """The position in the token sequence of the patch ``cell`` = (row, column)."""
    row_major = cell[0] * grid[1] + cell[1]
    return int(locality_order(tuple(grid))[1][row_major]) if reorder else row_major


@dataclass
class KeySet:
    """One query's part of LLSA: ``picked[l]`` are the level-l tokens its level-l ancestor picked
    (l = 1..levels; level 1's are the fine key blocks), ``attended[l]`` the level-l tokens in its key set
    (l = 0: fine tokens; l >= 1: enriched candidates, and every token of the coarsest level when
    ``enrich_levels == levels``)."""

    query: int
    block_size: int
    levels: int
    enrich_levels: int
    n: int
    picked: dict[int, list[int]] = field(default_factory=dict)
    attended: dict[int, list[int]] = field(default_factory=dict)

    def positions(self, level: int, token: int) -> range:
        """Sequence positions of the original tokens under level-``level`` token ``token``."""
        span = self.block_size ** level
        return range(token * span, min((token + 1) * span, self.n))


def key_sets(picks: list[torch.Tensor], query: int, n: int, block_size: int, enrich_levels: int) -> KeySet:
    """The :class:`KeySet` of the query at sequence position ``query``, from one (batch, head)'s picks:
    ``picks[l-1]`` (n_l, K), as ``hierarchical_topk(...)[l-1][b, h]``."""
    levels = len(picks)
    sizes = level_sizes(n, block_size, levels)
    ks = KeySet(query, block_size, levels, enrich_levels, n)
    for level in range(1, levels + 1):
        ancestor = min(query // block_size ** level, sizes[level] - 1)
        ks.picked[level] = picks[level - 1][ancestor].tolist()
    # segment l holds the level-l children of the level-(l+1) picks (segment 0: the fine tokens)
    for level in range(0, min(enrich_levels, levels - 1) + 1):
        ks.attended[level] = [p * block_size + c for p in ks.picked[level + 1] for c in range(block_size)
                              if p * block_size + c < sizes[level]]
    if enrich_levels == levels:
        ks.attended[levels] = list(range(sizes[levels]))
    return ks


@contextlib.contextmanager
def capture_qk(model, layer: int):
    """Within the block, ``seen["q"]`` and ``seen["k"]`` hold the (b, heads, N, D) q and k that the
    attention of block ``layer`` of DiT ``model`` was last called with (detached copies)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs):
        q, k = args[0], args[1]
        seen["q"], seen["k"] = q.detach().clone(), k.detach().clone()

    handle = model.blocks[layer].attn.method.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def default_queries(height: int, width: int) -> list[tuple[int, int]]:
    """Four query pixels (row, column), one in each quarter of the image, a little off its centre: the
    centre of a quarter of a power-of-two image is a corner of blocks, where the star hides which it marks."""
    return [(r * height // 16, c * width // 16) for r in (5, 11) for c in (5, 11)]


def query_key_sets(model, layer: int, q: torch.Tensor, k: torch.Tensor, pixels: list[tuple[int, int]],
                   head: int = 0) -> list[KeySet]:
    """The :class:`KeySet` of each query pixel (row, column) for head ``head`` of the first image of
    ``q, k``, as captured from block ``layer`` of DiT ``model``, with that layer's LLSA options."""
    cfg = model.config
    opts = model.blocks[layer].attn.method.opts
    n = q.shape[-2]
    levels = opts.levels if opts.levels is not None else default_levels(n, opts.block_size)
    enrich = levels if opts.enrich_levels is None else opts.enrich_levels
    if not 0 <= head < q.shape[1]:
        raise ValueError(f"head {head} does not exist; the model has heads 0..{q.shape[1] - 1}")
    qh, kh = q[:1, head:head + 1].float(), k[:1, head:head + 1].float()
    picks = [p[0, 0].cpu() for p in hierarchical_topk(qh, kh, block_size=opts.block_size, topk=opts.topk,
                                                       levels=levels)]
    grid = cfg.grid_size
    sets = []
    for row, col in pixels:
        cell = (row // cfg.patch_size, col // cfg.patch_size)
        if not (0 <= cell[0] < grid[0] and 0 <= cell[1] < grid[1]):
            raise ValueError(f"query pixel ({row}, {col}) is outside the {grid[0] * cfg.patch_size}x"
                             f"{grid[1] * cfg.patch_size} image")
        sets.append(key_sets(picks, sequence_position(cell, grid, cfg.reorder), n, opts.block_size, enrich))
    return sets


def label_map(ks: KeySet, level: int, tokens: list[int], cells: torch.Tensor, grid) -> np.ndarray:
    """A (rows, columns) map of patches: the index of the listed level-``level`` token each lies under, or -1."""
    label = np.full(grid, -1, dtype=np.int64)
    for token in tokens:
        where = cells[list(ks.positions(level, token))]
        label[where[:, 0].numpy(), where[:, 1].numpy()] = token
    return label


def _edges(label: np.ndarray, scale: int) -> list:
    """Line segments, in pixels, along patch edges between different tokens of ``label`` (and around them)."""
    rows, cols = label.shape
    pad = np.full((rows + 2, cols + 2), -1, dtype=np.int64)
    pad[1:-1, 1:-1] = label
    segments = []
    left, right = pad[1:-1, :-1], pad[1:-1, 1:]
    for r, c in zip(*np.nonzero((left != right) & ((left >= 0) | (right >= 0)))):
        segments.append([(c * scale, r * scale), (c * scale, (r + 1) * scale)])
    up, down = pad[:-1, 1:-1], pad[1:, 1:-1]
    for r, c in zip(*np.nonzero((up != down) & ((up >= 0) | (down >= 0)))):
        segments.append([(c * scale, r * scale), ((c + 1) * scale, r * scale)])
    return segments


def draw_picks(image: torch.Tensor, model, sets: list[KeySet], pixels: list[tuple[int, int]], title: str = ""):
    """A matplotlib Figure: one panel per query pixel (``sets``: their key sets in DiT ``model``), over
    ``image`` (C, H, W) in [0, 1], drawn gray: the query's block (outlined), its fine key blocks (filled),
    the picks of every coarser level (outlined), the enriched tokens they make attended (filled, lighter)
    and the coarsest tokens (dashed), with a legend."""
    from matplotlib.collections import LineCollection
    from matplotlib.colors import to_rgba
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    cfg = model.config
    p, grid = cfg.patch_size, cfg.grid_size
    cells = token_cells(grid, cfg.reorder)
    height, width = image.shape[-2:]
    # the image in muted gray, so that the overlays' colours read the same on any image
    shown = 0.15 + 0.7 * image.detach().float().cpu().clamp(0, 1).mean(0).numpy()
    # a bare Figure, not pyplot: no global state and no GUI backend, also inside a training run
    fig = Figure(figsize=(3.6 * len(pixels), 4.6))
    axes = fig.subplots(1, len(pixels), squeeze=False)
    handles: dict[str, object] = {}

    def fill(ax, label, colour, alpha):
        rgba = np.zeros((*grid, 4))
        rgba[label >= 0] = to_rgba(colour, alpha)
        ax.imshow(rgba, extent=(0, width, height, 0), interpolation="nearest")

    def outline(ax, label, colour, width_, style="solid"):
        ax.add_collection(LineCollection(_edges(label, p), colors=colour, linewidths=width_, linestyles=style))

    for ax, ks, (row, col) in zip(axes[0], sets, pixels):
        ax.imshow(shown, cmap="gray", vmin=0, vmax=1, extent=(0, width, height, 0), interpolation="nearest")
        top = ks.levels
        if ks.enrich_levels == top:
            outline(ax, label_map(ks, top, ks.attended[top], cells, grid), COARSEST_COLOUR, 0.8, "dashed")
            handles[f"level-{top} tokens: all attended (coarsest)"] = Line2D(
                [], [], color=COARSEST_COLOUR, linestyle="--", linewidth=1.5)
        for level in range(top, 1, -1):
            colour = LEVEL_COLOURS[(level - 1) % len(LEVEL_COLOURS)]
            child = level - 1
            if child in ks.attended:
                label = label_map(ks, child, ks.attended[child], cells, grid)
                fill(ax, label, colour, 0.3)
                outline(ax, label, colour, 0.5)
                handles[f"level-{child} tokens attended (enriched)"] = Patch(
                    facecolor=to_rgba(colour, 0.3), edgecolor=colour)
            outline(ax, label_map(ks, level, ks.picked[level], cells, grid), colour, 2.0)
            handles[f"level-{level} picks"] = Line2D([], [], color=colour, linewidth=2.5)
        fine = label_map(ks, 1, ks.picked[1], cells, grid)
        fill(ax, fine, LEVEL_COLOURS[0], 0.55)
        outline(ax, fine, LEVEL_COLOURS[0], 1.2)
        handles["fine key blocks (level-1 picks)"] = Patch(facecolor=to_rgba(LEVEL_COLOURS[0], 0.55),
                                                           edgecolor=LEVEL_COLOURS[0])
        own = label_map(ks, 1, [ks.query // ks.block_size], cells, grid)
        outline(ax, own, QUERY_COLOUR, 2.5)
        ax.plot(col + 0.5, row + 0.5, marker="*", markersize=14, color=QUERY_COLOUR, markeredgecolor="black")
        handles["query pixel and its own block"] = Line2D([], [], color=QUERY_COLOUR, marker="*", linewidth=2.5,
                                                          markeredgecolor="black", markersize=10)
        ax.set_title(f"query pixel (row {row}, col {col})", fontsize=9)
        # a margin, so that outlines along the image's border are not hidden under the frame
        margin = max(width, height) / 64
        ax.set_xlim(-margin, width + margin)
        ax.set_ylim(height + margin, -margin)
        ax.set_axis_off()
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(3, len(handles)), fontsize=8,
               facecolor="#b0b0b0", framealpha=1.0)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95 if title else 1))
    return fig


def figure_array(fig) -> np.ndarray:
    """The figure's pixels, (H, W, 3) uint8."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
