import pytest
import torch

from llsa.attention import ATTENTIONS
from llsa.flow import FlowMatching
from llsa.models import DIT_SIZES, DiT, DiTConfig, build_dit, load_lowres_checkpoint
from llsa.models.dit import token_grid
from llsa.ops.heads import apply_rope
from llsa.reorder import locality_order

# Tiny-image options for methods whose defaults assume large images or a GPU.
TINY_OPTIONS = {"llsa": dict(backend="torch", block_size=4, topk=2)}


def randomize(model, seed=0, std=0.1):
    """Perturb every parameter, so that zero-initialised gates and outputs do not hide differences."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def inputs(batch, size, seed=0, channels=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    return x, t


@pytest.mark.parametrize("size", sorted(DIT_SIZES))
def test_every_size_builds_and_runs(size):
    # Shapes only: the meta device skips the arithmetic of the large sizes.
    with torch.device("meta"):
        model = build_dit(size, image_size=8, attention="full")
        x, t = torch.empty(2, 3, 8, 8), torch.empty(2)
        assert model(x, t).shape == x.shape
    assert model.config.depth == DIT_SIZES[size]["depth"] and model.config.width == DIT_SIZES[size]["width"]


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_every_attention_runs_forward_and_backward(name):
    model = randomize(build_dit("DiT-T", image_size=16, attention=name, attention_options=TINY_OPTIONS.get(name, {})))
    x, t = inputs(2, 16)
    out = model(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n


def test_llsa_covering_every_block_equals_full_attention():
    full = randomize(build_dit("DiT-T", image_size=16, attention="full"))
    dense_llsa = build_dit("DiT-T", image_size=16, attention="llsa", attention_options=dict(
        block_size=16, topk=16, levels=1, enrich_levels=0, backend="torch"))
    sparse_llsa = build_dit("DiT-T", image_size=16, attention="llsa", attention_options=TINY_OPTIONS["llsa"])
    dense_llsa.load_state_dict(full.state_dict())
    sparse_llsa.load_state_dict(full.state_dict())
    x, t = inputs(2, 16, seed=1)
    ref = full(x, t)
    torch.testing.assert_close(dense_llsa(x, t), ref, atol=1e-5, rtol=1e-5)
    assert (sparse_llsa(x, t) - ref).abs().max() > 1e-3


def test_reordering_is_invisible_to_full_attention():
    a = randomize(build_dit("DiT-T", image_size=12, attention="full", reorder=True))
    b = build_dit("DiT-T", image_size=12, attention="full", reorder=False)
    b.load_state_dict(a.state_dict())
    x, t = inputs(2, 12)
    torch.testing.assert_close(a(x, t), b(x, t), atol=1e-5, rtol=1e-5)
    # Sparse attention sees the order.
    opts = TINY_OPTIONS["llsa"]
    c = build_dit("DiT-T", image_size=12, attention_options=opts, reorder=True)
    d = build_dit("DiT-T", image_size=12, attention_options=opts, reorder=False)
    c.load_state_dict(a.state_dict())
    d.load_state_dict(a.state_dict())
    assert (c(x, t) - d(x, t)).abs().max() > 1e-3


def test_patches_map_back_to_their_pixels():
    # Zero gates make every block the identity, so each output patch depends on its input patch only.
    model = build_dit("DiT-T", image_size=12, patch_size=2, in_channels=2, attention="full")
    randomize(model.patch_embed)
    randomize(model.final)
    x, t = inputs(1, 12, channels=2)
    x2 = x.clone()
    x2[0, 1, 5, 9] += 1.0
    changed = (model(x2, t) - model(x, t)).abs().sum(1)[0] > 1e-6
    expected = torch.zeros(12, 12, dtype=torch.bool)
    expected[4:6, 8:10] = True
    assert torch.equal(changed, expected)


def test_rope_positions_are_interpolated_onto_the_rope_grid():
    head_dim, cpu = 16, torch.device("cpu")
    cos8, sin8, _ = token_grid(8, 8, (8, 8), head_dim, False, cpu)
    cos15, sin15, _ = token_grid(15, 15, (8, 8), head_dim, False, cpu)
    # Position idx * 7 / 14: even indices of the 15-grid land on the 8-grid's integer positions.
    even = (torch.arange(15)[::2, None] * 15 + torch.arange(15)[None, ::2]).flatten()
    torch.testing.assert_close(cos15[even], cos8)
    torch.testing.assert_close(sin15[even], sin8)
    # The reordered table is the row-major one permuted like the tokens.
    cos_r, _, (perm, inv) = token_grid(8, 8, (8, 8), head_dim, True, cpu)
    torch.testing.assert_close(cos_r, cos8[perm])
    assert torch.equal(perm, locality_order((8, 8))[0])


def test_rope_scores_depend_on_relative_position_only():
    cos, sin, _ = token_grid(6, 6, (6, 6), 16, False, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 1, 16, generator=g).expand(2, 36, 16)
    scores = (apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).T)

    def idx(r, c):
        return r * 6 + c

    # Same offset (+1 row, +2 cols) at two places, and a different offset.
    s1 = scores[idx(0, 0), idx(1, 2)]
    s2 = scores[idx(3, 2), idx(4, 4)]
    s3 = scores[idx(3, 2), idx(4, 5)]
    torch.testing.assert_close(s1, s2)
    assert (s1 - s3).abs() > 1e-4


def test_same_weights_continue_at_higher_resolution():
    low = randomize(build_dit("DiT-T", image_size=8, attention="full"))
    high = load_lowres_checkpoint(build_dit("DiT-T", image_size=16, rope_size=8, attention="full"), low.state_dict())
    x, t = inputs(2, 16)
    out = high(x, t)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, low(x, t))


def test_load_lowres_checkpoint_into_llsa_model():
    src = randomize(build_dit("DiT-T", image_size=16, attention="full"))
    dst = build_dit("DiT-T", image_size=32, attention="llsa", attention_options=dict(backend="torch"))
    load_lowres_checkpoint(dst, src.state_dict())
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    x, t = inputs(1, 32)
    assert dst(x, t).shape == x.shape

    # A Lightning checkpoint holding a model and its EMA copy: the prefix picks one.
    ema = {k: v * 2 for k, v in src.state_dict().items()}
    ckpt = {"epoch": 3, "state_dict": {**{"model." + k: v for k, v in src.state_dict().items()},
                                       **{"ema." + k: v for k, v in ema.items()}}}
    load_lowres_checkpoint(dst, ckpt, prefix="ema.")
    for k, v in ema.items():
        assert torch.equal(dst.state_dict()[k], v), k
    with pytest.raises(KeyError, match="prefix"):
        load_lowres_checkpoint(dst, ckpt, prefix="teacher.")
    with pytest.raises(ValueError, match="prefix"):
        load_lowres_checkpoint(dst, ckpt)


@pytest.mark.parametrize("kwargs, match", [(dict(width=32, heads=2), "shape mismatch"),
                                           (dict(depth=3), "unexpected"),
                                           (dict(depth=1), "missing"),
                                           (dict(num_classes=10), "unexpected")])
def test_load_lowres_checkpoint_rejects_other_architectures(kwargs, match):
    src = build_dit("DiT-T", image_size=16, attention="full", **kwargs)
    with pytest.raises(ValueError, match=match):
        load_lowres_checkpoint(build_dit("DiT-T", image_size=32, attention="full"), src.state_dict())


@pytest.mark.parametrize("name", sorted(ATTENTIONS))
def test_attention_parameters_missing_from_the_checkpoint_keep_their_init(name):
    opts = TINY_OPTIONS.get(name, {})
    src = randomize(build_dit("DiT-T", image_size=8, attention="full"))
    dst = build_dit("DiT-T", image_size=16, attention=name, attention_options=opts)
    before = {k: v.clone() for k, v in dst.state_dict().items() if ".attn.method." in k}
    load_lowres_checkpoint(dst, src.state_dict())
    for k, v in before.items():
        assert torch.equal(dst.state_dict()[k], v), k
    # And the other way round: a method's own parameters are not needed by full attention.
    back = build_dit("DiT-T", image_size=16, attention="full")
    load_lowres_checkpoint(back, randomize(dst).state_dict())


def test_class_conditioning_and_label_dropout():
    model = randomize(build_dit("DiT-T", image_size=8, attention="full", num_classes=10, class_dropout=0.5))
    x, t = inputs(2, 8)
    y = torch.tensor([3, 7])
    out = model(x, t, y)
    assert out.shape == x.shape
    torch.testing.assert_close(model(x, t), model(x, t, torch.tensor([10, 10])))
    assert (out - model(x, t)).abs().max() > 1e-4
    labels = torch.randint(0, 10, (4000,), generator=torch.Generator().manual_seed(0))
    dropped = model.drop_labels(labels, torch.Generator().manual_seed(1))
    changed = dropped != labels
    assert (dropped[changed] == 10).all() and abs(changed.float().mean().item() - 0.5) < 0.05
    model.eval()
    assert torch.equal(model.drop_labels(labels, torch.Generator().manual_seed(1)), labels)
    with pytest.raises(ValueError, match="unconditional"):
        build_dit("DiT-T", image_size=8, attention="full")(x, t, y)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(width=24, heads=4), ValueError, "multiple of 4"),
    (dict(width=64, heads=3), ValueError, "divisible by `heads`"),
    (dict(image_size=15, patch_size=2), ValueError, "patch_size"),
    (dict(image_size=(16, 0)), ValueError, "image_size"),
    (dict(rope_size=0), ValueError, "rope_size"),
    (dict(attention="nope"), ValueError, "full"),
    (dict(attention="llsa", attention_options=dict(blok_size=4)), TypeError, "block_size"),
    (dict(attention="llsa", attention_options=dict(topk=0)), ValueError, "topk"),
    (dict(class_dropout=1.0), ValueError, "class_dropout"),
])
def test_bad_configs_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        DiTConfig(**{**DIT_SIZES["DiT-T"], **kwargs})


def test_bad_calls_raise_clear_errors():
    with pytest.raises(KeyError, match="DiT-S"):
        build_dit("DiT-XXL")
    model = build_dit("DiT-T", image_size=8, patch_size=2, attention="full")
    with pytest.raises(ValueError, match="patch_size"):
        model(torch.randn(1, 3, 8, 9), torch.zeros(1))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 1, 8, 8), torch.zeros(1))
    assert isinstance(model, DiT)


@pytest.mark.slow
def test_dit_overfits_one_image():
    torch.manual_seed(0)
    model = build_dit("DiT-T", image_size=16, attention="full")
    flow = FlowMatching(16)
    # A smooth image: with RoPE only, a per-pixel noise image would need absolute positions.
    i = torch.arange(16.0)
    x0 = 0.8 * torch.stack([torch.sin(i / 5)[:, None] * torch.cos(i / 7)[None],
                            torch.cos(i / 4)[:, None].expand(16, 16),
                            torch.sin((i[:, None] + i[None]) / 6)])[None]

    def eval_loss():
        with torch.no_grad():
            g = torch.Generator().manual_seed(123)
            return sum(flow.loss(model, x0.expand(64, -1, -1, -1), g).item() for _ in range(4)) / 4

    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    # Small ops: a second thread only adds synchronisation on a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before = eval_loss()
        for _ in range(300):
            loss = flow.loss(model, x0.expand(8, -1, -1, -1), g)
            opt.zero_grad()
            loss.backward()
            opt.step()
        after = eval_loss()
    finally:
        torch.set_num_threads(threads)
    assert after < before / 10, (before, after)
