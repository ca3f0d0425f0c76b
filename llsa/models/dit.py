"""A pixel-space Diffusion Transformer with pluggable attention.

DiT blocks with adaLN modulation, QK RMSNorm and 2-D axial RoPE (no learned position embedding, so one
set of weights runs at any resolution), following the LLSA paper's model (paper-notes section 4.1).
With ``reorder`` on, tokens are put in a locality-preserving order after the input projection, so that
the runs of consecutive tokens that sparse attention pools are compact image patches.
"""
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from torch import nn

from llsa import attention
from llsa.ops.heads import merge_heads, split_heads
from llsa.reorder import locality_order


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


@dataclass
class DiTConfig:
    """Architecture of a :class:`DiT`.

    ``image_size``: int or ``(H, W)`` pixels. ``rope_size``: the fixed grid (int or ``(H, W)``, in
    patches) that RoPE positions are interpolated onto; None takes the image size in patches.
    ``num_classes=0`` is unconditional; otherwise label ``num_classes`` is the null class that
    ``class_dropout`` (a training-time rate, applied by :meth:`DiT.drop_labels`) swaps labels for.
    ``attention`` names a method of ``llsa.attention.ATTENTIONS`` built with ``attention_options``.
    """

    depth: int
    width: int
    heads: int
    mlp_ratio: float = 4.0
    patch_size: int = 1
    in_channels: int = 3
    image_size: int | tuple[int, int] = 32
    rope_size: int | tuple[int, int] | None = None
    num_classes: int = 0
    class_dropout: float = 0.1
    attention: str = "llsa"
    attention_options: dict = field(default_factory=dict)
    reorder: bool = True
    qk_norm: bool = True

    def __post_init__(self):
        for name in ("depth", "width", "heads", "patch_size", "in_channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DiTConfig: `{name}` must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"DiTConfig: `width`={self.width} is not divisible by `heads`={self.heads}")
        if self.head_dim % 4:
            raise ValueError(f"DiTConfig: the head dim width/heads = {self.head_dim} must be a multiple of 4, "
                             "since 2-D RoPE rotates pairs of dims, half for rows and half for columns; "
                             "change `width` or `heads`")
        if self.mlp_ratio <= 0:
            raise ValueError(f"DiTConfig: `mlp_ratio` must be > 0, got {self.mlp_ratio}")
        h, w = _pair(self.image_size)
        if h < 1 or w < 1 or h % self.patch_size or w % self.patch_size:
            raise ValueError(f"DiTConfig: `image_size`={self.image_size} must be positive and divisible by "
                             f"`patch_size`={self.patch_size}")
        if self.rope_size is not None and min(_pair(self.rope_size)) < 1:
            raise ValueError(f"DiTConfig: `rope_size` must be >= 1 (in patches) or None, got {self.rope_size}")
        if self.num_classes < 0:
            raise ValueError(f"DiTConfig: `num_classes` must be >= 0 (0 = unconditional), got {self.num_classes}")
        if not 0 <= self.class_dropout < 1:
            raise ValueError(f"DiTConfig: `class_dropout` must be in [0, 1), got {self.class_dropout}")
        if self.attention not in attention.ATTENTIONS:
            raise ValueError(f"DiTConfig: unknown `attention`={self.attention!r}; "
                             f"choose one of {sorted(attention.ATTENTIONS)}")
        try:
            attention.options_for(self.attention, **self.attention_options)
        except (TypeError, ValueError) as err:
            raise type(err)(f"DiTConfig.attention_options: {err}") from err

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def grid_size(self) -> tuple[int, int]:
        """Image size in patches."""
        h, w = _pair(self.image_size)
        return h // self.patch_size, w // self.patch_size

    @property
    def rope_grid(self) -> tuple[int, int]:
        return self.grid_size if self.rope_size is None else _pair(self.rope_size)


DIT_SIZES = {
    "DiT-T": dict(depth=2, width=64, heads=4),
    # the embedded CPU default's model: 1.3 M parameters, about 0.25 s a step of 32 16x16 images on two cores
    "DiT-XXS": dict(depth=4, width=128, heads=4),
    # the small ablation grids' model: about a quarter of DiT-S's matmul work per token, so a run of a few
    # GPU-minutes sees several epochs of Fashion-MNIST at 64x64
    "DiT-XS": dict(depth=6, width=256, heads=4),
    "DiT-S": dict(depth=12, width=384, heads=6),
    "DiT-B": dict(depth=12, width=768, heads=12),
}


def build_dit(size: str, **overrides) -> "DiT":
    """``DiT`` of a named size from ``DIT_SIZES``; ``overrides`` are any other ``DiTConfig`` fields."""
    if size not in DIT_SIZES:
        raise KeyError(f"unknown DiT size {size!r}; choose one of {sorted(DIT_SIZES)}")
    return DiT(DiTConfig(**{**DIT_SIZES[size], **overrides}))


# Run eagerly under torch.compile: traced, the tables would be rebuilt on the CPU and copied to the GPU on
# every step (four synchronising host-to-device copies); eagerly the cache answers.
@torch.compiler.disable
@lru_cache(maxsize=8)
def token_grid(hp: int, wp: int, rope_grid: tuple[int, int], head_dim: int, reorder: bool,
               device: torch.device):
    """RoPE ``cos, sin`` (N, head_dim/2) in sequence order, and the ``(perm, inv)`` order (or None)."""
    theta = 10000.0
    axis_dim = head_dim // 2
    # Built on the CPU whatever the default device, then moved: the result is cached per device.
    freqs = theta ** (-torch.arange(0, axis_dim, 2, dtype=torch.float64, device="cpu") / axis_dim)

    def positions(side, rope_side):
        # Interpolate onto the fixed rope grid so that any resolution spans the same position range.
        step = (rope_side - 1) / (side - 1) if side > 1 else 0.0
        return torch.arange(side, dtype=torch.float64, device="cpu") * step

    rows = positions(hp, rope_grid[0])[:, None].expand(hp, wp).flatten()
    cols = positions(wp, rope_grid[1])[None, :].expand(hp, wp).flatten()
    # [N, head_dim/2]: the first head_dim/4 pairs rotate with the row, the others with the column
    angles = torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=-1)
    order = None
    if reorder:
        perm, inv = locality_order((hp, wp))
        angles = angles[perm]
        order = (perm.to(device), inv.to(device))
    return angles.cos().float().to(device), angles.sin().float().to(device), order


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of ``t`` in [0, 1000] followed by Linear-SiLU-Linear.

    One instance serves every block. The paper's code (through diffusers) gives each block its own
    copy of this MLP; one shared MLP is the original DiT design and has fewer parameters.
    """

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class QKNorm(nn.Module):
    """The learnable scale of an RMSNorm over the head dim; ``split_heads`` normalises with it, in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))


class SelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        # RMSNorm over the head dim, before RoPE: keeps logits bounded in bf16 training.
        self.q_norm = QKNorm(cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = QKNorm(cfg.head_dim) if cfg.qk_norm else None
        self.method = attention.build(cfg.attention, cfg.width, cfg.heads, **cfg.attention_options)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        norm = () if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
        # [b, n, 3 * width] -> 3 x [b, heads, n, head_dim], q and k normalised and rotated
        q, k, v = split_heads(self.qkv(x), self.heads, cos, sin, *norm)
        o = self.method(q, k, v, x=x)
        # [b, heads, n, head_dim] -> [b, n, width]
        return self.proj(merge_heads(o))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.norm1 = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(hidden, cfg.width))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 6 * cfg.width))

    def forward(self, x, c, cos, sin):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 2 * cfg.width))
        self.linear = nn.Linear(cfg.width, cfg.patch_size ** 2 * cfg.in_channels)

    def forward(self, x, c):
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """``forward(x, t, y=None)``: images ``x`` (B, C, H, W), times ``t`` (B,) in [0, 1000] (1000 * sigma),
    labels ``y`` (B,) or None -> predicted velocity (B, C, H, W).

    Any ``H, W`` divisible by the patch size runs with the same weights: RoPE positions are
    interpolated onto the fixed ``rope_grid``. Unlabelled calls of a class-conditional model use the
    null class.
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.t_embed = TimestepEmbedder(cfg.width)
        self.y_embed = nn.Embedding(cfg.num_classes + 1, cfg.width) if cfg.num_classes else None
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(cfg)
        self._init_weights()

    def _init_weights(self):
        # Attention methods (``attn.method``) keep their own initialisation, e.g. zero gates.
        def xavier(linear):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

        def zero(linear):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for linear in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
            nn.init.zeros_(linear.bias)
        if self.y_embed is not None:
            nn.init.normal_(self.y_embed.weight, std=0.02)
        # adaLN-Zero, the standard DiT practice: every block starts as the identity and the output as
        # zero. The paper's released code kept PyTorch's default init here instead.
        for block in self.blocks:
            for linear in (block.attn.qkv, block.attn.proj, block.mlp[0], block.mlp[2]):
                xavier(linear)
            zero(block.adaLN[-1])
        zero(self.final.adaLN[-1])
        zero(self.final.linear)

    def drop_labels(self, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """In training, replace each label by the null class with probability ``class_dropout``."""
        cfg = self.config
        if not self.training or cfg.num_classes == 0 or cfg.class_dropout == 0:
            return y
        drop = torch.rand(y.shape, generator=generator, device=generator.device).to(y.device) < cfg.class_dropout
        return torch.where(drop, torch.full_like(y, cfg.num_classes), y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        b, c, h, w = x.shape
        p = cfg.patch_size
        if c != cfg.in_channels:
            raise ValueError(f"DiT: input has {c} channels but `in_channels`={cfg.in_channels}")
        if h % p or w % p:
            raise ValueError(f"DiT: input size {h}x{w} is not divisible by `patch_size`={p}")
        if y is not None and not cfg.num_classes:
            raise ValueError("DiT: labels `y` were given to an unconditional model (num_classes=0)")
        t = torch.as_tensor(t, device=x.device).expand(b)
        hp, wp = h // p, w // p
        cos, sin, order = token_grid(hp, wp, cfg.rope_grid, cfg.head_dim, cfg.reorder, x.device)

        # [b, width, hp, wp] -> [b, N, width], row-major
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        if order is not None:
            tokens = tokens[:, order[0]]
        cond = self.t_embed(t)
        if self.y_embed is not None:
            if y is None:
                y = torch.full((b,), cfg.num_classes, device=x.device, dtype=torch.long)
            cond = cond + self.y_embed(y)
        for block in self.blocks:
            tokens = block(tokens, cond, cos, sin)
        if order is not None:
            tokens = tokens[:, order[1]]
        out = self.final(tokens, cond)
        # [b, hp * wp, p * p * c] -> [b, c, hp, p, wp, p]
        out = out.view(b, hp, wp, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, c, h, w)


def load_lowres_checkpoint(model: DiT, state_dict: Mapping, prefix: str | None = None) -> DiT:
    """Load the weights of a DiT trained at another resolution (or with another attention) into ``model``.

    Weights do not depend on the resolution, so every parameter must exist with the same shape, except
    those of the attention methods (``...attn.method.*``): ones missing from the checkpoint keep the
    model's own init (e.g. zero VSA gates), ones the model lacks are ignored. ``state_dict`` may be a
    Lightning checkpoint (its ``"state_dict"`` entry is used); ``prefix`` (e.g. ``"ema."`` or
    ``"model."``) selects and strips the keys of one sub-module. Returns ``model``.
    """
    if isinstance(state_dict.get("state_dict"), Mapping):
        state_dict = state_dict["state_dict"]
    if prefix:
        source = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if not source:
            raise KeyError(f"load_lowres_checkpoint: no key starts with `prefix`={prefix!r}; "
                           f"the checkpoint's keys look like {list(state_dict)[:3]}")
    else:
        source = dict(state_dict)

    def is_method(key):
        return ".attn.method." in key

    target = model.state_dict()
    missing = [k for k in target if k not in source and not is_method(k)]
    unexpected = [k for k in source if k not in target and not is_method(k)]
    mismatched = [f"{k}: checkpoint {tuple(source[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in target.items() if k in source and source[k].shape != v.shape]
    if missing or unexpected or mismatched:
        problems = [f"{name} ({len(keys)}): {keys[:5]}" for name, keys in
                    (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)) if keys]
        raise ValueError("load_lowres_checkpoint: the checkpoint does not fit this model; "
                         + "; ".join(problems)
                         + ". Depth, width, heads, patch_size, in_channels, num_classes and qk_norm must match"
                           " (and pass `prefix`, e.g. 'model.' or 'ema.', for a wrapped checkpoint).")
    model.load_state_dict({k: source.get(k, v) for k, v in target.items()})
    return model
