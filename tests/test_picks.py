"""LLSA's selection drawn: token order to pixels, one query's key set, `run.py picks` and the TensorBoard image."""
import numpy as np
import pytest
import torch
from PIL import Image

import run
from lightning_modules.config import load_config
from lightning_modules.train import fit
from llsa.models import build_dit
from llsa.picks import capture_qk, key_sets, label_map, sequence_position, token_cells

# Morton order of a 4x4 grid: the row-major index of each sequence position
MORTON_4X4 = [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
# 8x8 images of 64 pixel tokens: blocks of 4, top-2, so levels = floor(log_4 64) - 1 = 2
OVERRIDES = ["data.name=procedural", "data.resolution=8", "data.batch_size=2", "data.num_workers=0",
             "model.patch_size=1", "train.log_every=1", "train.warmup_perf_steps=0", "eval.fid_samples=0",
             "eval.grid_size=2", "eval.fid_batch_size=2", "flow.sample_steps=2"]
LLSA = ["model.attention.options.block_size=4", "model.attention.options.topk=2",
        "model.attention.options.backend=torch"]


def tiny_fit(tmp_path, name, *extra):
    return fit(load_config(None, [f"run.out_dir={tmp_path}", f"run.name={name}", *OVERRIDES, *extra]),
               progress=False)


@pytest.fixture(scope="module")
def llsa_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    tiny_fit(out, "llsa", *LLSA, "train.max_steps=2")
    return out / "llsa" / "checkpoints" / "last.ckpt"


def test_token_cells_follow_the_dits_order():
    rows = [(i // 4, i % 4) for i in MORTON_4X4]
    assert token_cells((4, 4), reorder=True).tolist() == [list(r) for r in rows]
    assert token_cells((4, 4), reorder=False).tolist() == [[i // 4, i % 4] for i in range(16)]
    # (0, 2) is the 3rd patch of row-major order but the 5th of the Morton order
    assert sequence_position((0, 2), (4, 4), reorder=False) == 2
    assert sequence_position((0, 2), (4, 4), reorder=True) == 4
    for grid in ((4, 4), (3, 5), (6, 4)):
        for reorder in (True, False):
            cells = token_cells(grid, reorder)
            assert all(sequence_position(tuple(c), grid, reorder) == s for s, c in enumerate(cells.tolist()))


@pytest.mark.parametrize("reorder", [True, False])
def test_a_pixel_is_the_token_the_dit_puts_at_its_position(reorder):
    """The DiT's own first-block input: only the token of the one lit patch is not the bias."""
    torch.manual_seed(0)
    model = build_dit("DiT-T", image_size=12, in_channels=1, patch_size=2, attention="full", reorder=reorder).eval()
    seen = {}

    def keep(module, args):
        seen["x"] = args[0]

    model.blocks[0].register_forward_pre_hook(keep)
    x = torch.zeros(1, 1, 12, 12)
    x[0, 0, 7, 2] = 1.0  # patch (3, 1) of a 6x6 grid
    model(x, torch.zeros(1))
    lit = (seen["x"][0] - model.patch_embed.bias).abs().sum(-1).nonzero().flatten().tolist()
    assert lit == [sequence_position((3, 1), (6, 6), reorder)]
    assert token_cells((6, 6), reorder)[lit[0]].tolist() == [3, 1]


def test_key_set_and_its_pixels_with_and_without_reorder():
    # 16 tokens, blocks of 4: level 1 has 4 tokens, level 2 one; level-1 query block 1 picked blocks 0 and 3
    picks = [torch.tensor([[1, 2], [0, 3], [1, 3], [0, 1]]), torch.tensor([[0]])]
    ks = key_sets(picks, query=5, n=16, block_size=4, enrich_levels=2)
    assert ks.picked == {1: [0, 3], 2: [0]}
    assert ks.attended == {0: [0, 1, 2, 3, 12, 13, 14, 15], 1: [0, 1, 2, 3], 2: [0]}
    plain = key_sets(picks, query=5, n=16, block_size=4, enrich_levels=0)
    assert plain.attended == {0: [0, 1, 2, 3, 12, 13, 14, 15]}

    # block 3 (tokens 12..15) is the bottom-right 2x2 square in Morton order, the last row without it
    morton = label_map(ks, 1, [3], token_cells((4, 4), True), (4, 4))
    assert np.argwhere(morton == 3).tolist() == [[2, 2], [2, 3], [3, 2], [3, 3]]
    rows = label_map(ks, 1, [3], token_cells((4, 4), False), (4, 4))
    assert np.argwhere(rows == 3).tolist() == [[3, 0], [3, 1], [3, 2], [3, 3]]


def test_capture_sees_the_layers_q_and_k_and_lets_go():
    model = build_dit("DiT-T", image_size=8, in_channels=3, patch_size=1, attention="llsa",
                      attention_options={"block_size": 4, "topk": 2, "backend": "torch"})
    x = torch.randn(2, 3, 8, 8)
    calls = []
    method = model.blocks[1].attn.method
    method.register_forward_hook(lambda module, args, out: calls.append(args[:2]))
    with capture_qk(model, 1) as seen:
        model(x, torch.full((2,), 500.0))
    assert torch.equal(seen["q"], calls[0][0]) and torch.equal(seen["k"], calls[0][1])
    assert seen["q"].shape == (2, 4, 64, 16)
    model(x, torch.zeros(2))
    assert len(calls) == 2 and torch.equal(seen["q"], calls[0][0])


def test_picks_command_writes_a_legible_png(llsa_ckpt, tmp_path, capsys):
    out = tmp_path / "picks.png"
    assert run.main(["picks", str(llsa_ckpt), "--out", str(out), "--query", "1,1", "--query", "6,5"]) == 0
    assert str(out) in capsys.readouterr().out
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape[0] > 300 and image.shape[1] > 600
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 200
    # the fine picks' red and the query's cyan are drawn
    red = (image[..., 0] > 180) & (image[..., 1] < 110) & (image[..., 2] < 110)
    cyan = (image[..., 0] < 60) & (image[..., 1] > 200) & (image[..., 2] > 220)
    assert red.sum() > 100 and cyan.sum() > 50
    # default: four query pixels, next to the run's sample grids
    assert run.main(["picks", str(llsa_ckpt), "--layer", "0", "--head", "3"]) == 0
    assert (llsa_ckpt.parent.parent / "samples" / "last_picks.png").is_file()


@pytest.mark.parametrize("args, words", [
    (["--layer", "7"], ["--layer 7", "0..3"]),
    (["--head", "9"], ["head 9", "0..3"]),
    (["--query", "8,0"], ["(8, 0)", "8x8"]),
    (["--query", "3"], ["ROW,COL"]),
])
def test_picks_command_bad_options_get_one_line(llsa_ckpt, tmp_path, capsys, args, words):
    assert run.main(["picks", str(llsa_ckpt), "--out", str(tmp_path / "p.png"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    for word in words:
        assert word in err[0]


def test_picks_of_a_checkpoint_without_llsa_is_one_line(tmp_path, capsys):
    tiny_fit(tmp_path, "full", "model.attention.name=full", "train.max_steps=1")
    assert run.main(["picks", str(tmp_path / "full" / "checkpoints" / "last.ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "model.attention.name=full, not llsa" in err[0]


def test_training_logs_the_picks_at_each_evaluation(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tiny_fit(tmp_path, "tb", *LLSA, "train.max_steps=3", "eval.grid_every=2")
    events = EventAccumulator(str(tmp_path / "tb" / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert "picks/llsa" in events.Tags()["images"]
    logged = events.Images("picks/llsa")
    assert [e.step for e in logged] == [2, 3]
    assert logged[-1].width > 600 and logged[-1].height > 300
    # a run without LLSA has nothing to draw
    tiny_fit(tmp_path, "dense", "model.attention.name=full", "train.max_steps=1")
    dense = EventAccumulator(str(tmp_path / "dense" / "tb"), size_guidance={"images": 0})
    dense.Reload()
    assert "picks/llsa" not in dense.Tags()["images"] and "samples/ema" in dense.Tags()["images"]
