"""Training: a short fit with every registered attention, exact resume, throughput counts, the run commands."""
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import run
from llsa.attention import ATTENTIONS
from lightning_modules.callbacks import ThroughputMonitor, save_grid
from lightning_modules.config import load_config
from lightning_modules.data import ProceduralDataset
from lightning_modules.module import DiffusionModule, ema_decay_at
from lightning_modules.train import fit

# Tiny sparse settings for 8x8 images (64 pixel tokens): blocks of 4 tokens, 2 picked.
SMALL_OPTIONS = {"block_size": 4, "topk": 2, "backend": "torch"}


def tiny_config(tmp_path, name, attention="full", batch_size=2, **extra):
    _, options_cls = ATTENTIONS[attention]
    fields = {f.name for f in dataclasses.fields(options_cls)}
    overrides = [
        f"run.out_dir={tmp_path}", f"run.name={name}", "data.name=procedural", "data.resolution=8",
        f"data.batch_size={batch_size}", "data.num_workers=0", "model.patch_size=1", f"model.attention.name={attention}",
        "train.log_every=1", "train.warmup_perf_steps=0", "eval.fid_samples=0", "eval.grid_size=2",
        "eval.fid_batch_size=2", "flow.sample_steps=1", "data.class_labels=false",
    ]
    overrides += [f"model.attention.options.{k}={v}" for k, v in SMALL_OPTIONS.items() if k in fields]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


@pytest.mark.parametrize("attention", sorted(ATTENTIONS))
def test_fit_runs_with_every_attention(tmp_path, attention):
    summary = fit(tiny_config(tmp_path, attention, attention, **{"train.max_steps": 2}), progress=False)
    run_dir = tmp_path / attention
    assert summary["global_step"] == 2
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    # 2 images of 8 px, drawn 64 px wide (save_grid.MIN_CELL), 1 px padding
    assert Image.open(summary["grid"]).size == (2 * 65 + 1, 65 + 1)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and "noise_generator" in ckpt
    state = ckpt["state_dict"]
    # EMA tracked the trained weights (first update copies, second blends), which moved from their init
    ema_keys = [k for k in state if k.startswith("ema.")]
    assert ema_keys and any(not torch.equal(state[k], state["model." + k[4:]]) for k in ema_keys)
    assert torch.isfinite(torch.stack([v.float().abs().sum() for v in state.values()])).all()


def test_a_run_killed_during_its_final_evaluation_evaluates_when_resumed(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_modules.callbacks import EvaluationCallback

    args = {"train.max_steps": 2, "eval.fid_samples": 3, "eval.fid_features": "tiny", "eval.fid_ref_max": 4}
    with monkeypatch.context() as m:
        # the kill: the checkpoint of the last step is written, the final FID and sample grid are not
        m.setattr(EvaluationCallback, "on_train_end", lambda *a: None)
        m.setattr(EvaluationCallback, "on_fit_end", lambda *a: None)
        first = fit(tiny_config(tmp_path, "killed", **args), progress=False)
    assert first["fid"] is None and first["grid"] is None
    resumed = fit(tiny_config(tmp_path, "killed", **args, **{"train.ckpt_path": "last"}), progress=False)
    assert resumed["global_step"] == 2 and resumed["fid"] is not None and Image.open(resumed["grid"])
    events = EventAccumulator(str(tmp_path / "killed" / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("val/fid")] == [(2, pytest.approx(resumed["fid"]))]


def test_compiled_model_trains_and_keeps_eager_parameter_names(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    # aot_eager traces forward and backward as inductor would, without generating code (fast on the CPU)
    args = {"train.max_steps": 2, "train.compile": "default", "train.compile_backend": "aot_eager"}
    summary = fit(tiny_config(tmp_path, "compiled", "llsa", **args), progress=False)
    assert summary["global_step"] == 2 and counters["stats"]["unique_graphs"] >= 1
    state = torch.load(tmp_path / "compiled" / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)["state_dict"]
    assert not any("_orig_mod" in key for key in state)
    assert torch.isfinite(torch.stack([v.float().abs().sum() for v in state.values()])).all()
    with pytest.raises(ValueError, match="train.compile"):
        tiny_config(tmp_path, "bad", **{"train.compile": "fastest"})


def test_compiled_fid_sampling_scores_as_eager_and_stays_out_of_checkpoints(tmp_path):
    from torch._dynamo.utils import counters

    args = {"train.max_steps": 2, "eval.fid_samples": 4, "eval.fid_features": "tiny", "eval.fid_ref_max": 4}
    eager = fit(tiny_config(tmp_path, "eager", "llsa", **args, **{"eval.compile": "null"}), progress=False)
    torch._dynamo.reset()
    counters.clear()
    compiled = fit(tiny_config(tmp_path, "compiled", "llsa", **args, **{"eval.compile": "default",
                                                                         "train.compile_backend": "aot_eager"}),
                   progress=False)
    # training stayed eager (train.compile auto on the CPU), so only the sampler was traced
    assert counters["stats"]["unique_graphs"] >= 1
    assert compiled["fid"] == pytest.approx(eager["fid"], rel=1e-4)
    state = torch.load(tmp_path / "compiled" / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=False)["state_dict"]
    assert not any("sampling" in key or "_orig_mod" in key for key in state)
    with pytest.raises(ValueError, match="eval.compile"):
        tiny_config(tmp_path, "bad", **{"eval.compile": "fastest"})


@pytest.mark.parametrize("resident", [False, True])
def test_resume_from_last_continues_exactly(tmp_path, resident):
    # A DataLoader's shuffling is not replayed mid-epoch by Lightning, so that case trains on one image in
    # batches of one; resident batches depend only on the step, so there the epoch (3 batches) is shuffled.
    data = ProceduralDataset(8, size=6 if resident else 1)
    args = {"train.ckpt_every": 2, "data.resident": resident}
    batch = 2 if resident else 1
    fit(tiny_config(tmp_path, "straight", batch_size=batch, **{"train.max_steps": 4}, **args), dataset=data,
        progress=False)
    fit(tiny_config(tmp_path, "resumed", batch_size=batch, **{"train.max_steps": 2}, **args), dataset=data,
        progress=False)
    summary = fit(tiny_config(tmp_path, "resumed", batch_size=batch, **{"train.max_steps": 4, "train.ckpt_path": "last"},
                              **args), dataset=data, progress=False)
    assert summary["global_step"] == 4
    ckpts = sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step_0000002.ckpt", "step_0000004.ckpt"]

    a, b = (torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
            for name in ("straight", "resumed"))
    assert a["global_step"] == b["global_step"] == 4
    assert torch.equal(a["noise_generator"], b["noise_generator"])
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        torch.testing.assert_close(a["state_dict"][key], b["state_dict"][key], atol=1e-6, rtol=1e-5, msg=key)
    opt_a, opt_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_a[i][name], opt_b[i][name], atol=1e-7, rtol=1e-5)

    # the run commands work from that checkpoint alone
    last = tmp_path / "resumed" / "checkpoints" / "last.ckpt"
    out = tmp_path / "grid.png"
    assert run.main(["sample", str(last), "--out", str(out), "eval.grid_size=4", "flow.sampler=heun"]) == 0
    assert Image.open(out).size == (2 * 65 + 1, 2 * 65 + 1)
    assert run.main(["fid", str(last), "eval.fid_samples=4", "eval.fid_ref_max=6", "eval.fid_features=tiny"]) == 0


def test_init_from_copies_the_lowres_ema(tmp_path):
    fit(tiny_config(tmp_path, "low", **{"train.max_steps": 1}), progress=False)
    path = tmp_path / "low" / "checkpoints" / "last.ckpt"
    cfg = tiny_config(tmp_path, "high", **{"data.resolution": 16, "data.channels": 3})
    module = DiffusionModule(OmegaConf.to_container(cfg))
    module.init_from(str(path))
    source = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    for key, value in module.model.state_dict().items():
        torch.testing.assert_close(value, source["ema." + key])
        torch.testing.assert_close(module.ema.state_dict()[key], value)


def test_lr_schedules_warm_up_then_decay_to_the_final_ratio():
    from lightning_modules.module import lr_factor

    assert [lr_factor(s, 4, 20, "constant", 0.0) for s in (0, 3, 4, 19)] == [0.25, 1.0, 1.0, 1.0]
    cosine = [lr_factor(s, 4, 20, "cosine", 0.1) for s in range(20)]
    assert cosine[4] == pytest.approx(1.0) and cosine[12] == pytest.approx(0.55) and cosine[19] > 0.1
    assert lr_factor(20, 4, 20, "cosine", 0.1) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cosine[4:], cosine[5:]))
    assert lr_factor(12, 4, 20, "linear", 0.0) == pytest.approx(0.5)


def test_ema_decay_warmup():
    assert ema_decay_at(0, 0.9999, True) == 0.0
    assert ema_decay_at(1, 0.9999, True) == pytest.approx(1 - 2 ** -0.75)
    assert ema_decay_at(10 ** 9, 0.9999, True) == 0.9999
    assert ema_decay_at(0, 0.99, False) == 0.99


def test_throughput_counts_pixel_tokens_after_warmup_and_leaves_out_evaluations(monkeypatch):
    logged = []
    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, metrics)))
    evaluation = SimpleNamespace(seconds=0.0)
    monkeypatch.setattr("lightning_modules.callbacks.EvaluationCallback", SimpleNamespace)
    trainer = SimpleNamespace(global_step=0, world_size=2, is_global_zero=True, loggers=[logger],
                              callbacks=[evaluation])
    module = SimpleNamespace(device=torch.device("cpu"))
    now = [0.0]
    monkeypatch.setattr("lightning_modules.callbacks.time.perf_counter", lambda: now[0])
    monitor = ThroughputMonitor(warmup_steps=3, log_every=4)
    batch = (torch.zeros(5, 1, 6, 7), torch.zeros(5))
    for step in range(1, 10):
        monitor.on_train_batch_start(trainer, module, batch, step - 1)
        # every step takes 2 "seconds"; an evaluation after step 6 takes 5 more, inside the window
        now[0] += 2
        trainer.global_step = step
        monitor.on_train_batch_end(trainer, module, None, batch, step - 1)
        if step == 6:
            now[0] += 5
            evaluation.seconds += 5
    monitor.on_train_end(trainer, module)
    # steps 4..9 are timed; each is 5 images per rank x 2 ranks of 6 x 7 pixels
    assert monitor.steps == 6 and monitor.images == 60 and monitor.tokens == 60 * 42
    summary = monitor.summary()
    assert summary["perf/tokens_per_s"] == pytest.approx(60 * 42 / 12)
    assert summary["perf/images_per_s"] == pytest.approx(5.0)
    assert summary["perf/step_ms"] == pytest.approx(2000.0)
    # logged at steps 4 (one timed step), 8 (steps 5..8, the evaluation left out) and 9 (the end)
    assert [step for step, _ in logged] == [4, 8, 9]
    assert logged[0][1]["perf/tokens_per_s"] == pytest.approx(10 * 42 / 2)
    assert logged[1][1]["perf/tokens_per_s"] == pytest.approx(40 * 42 / 8)
    assert logged[2][1]["perf/step_ms"] == pytest.approx(2000.0)
    assert logged[1][1]["perf/peak_mem_gb"] > 0


def test_class_conditional_fit_takes_the_class_count_from_the_data(tmp_path):
    summary = fit(tiny_config(tmp_path, "cond", **{"train.max_steps": 1, "data.class_labels": "true",
                                                   "flow.cfg_scale": 2.0}), progress=False)
    saved = load_config(tmp_path / "cond" / "config.yaml")
    assert saved.model.num_classes == 4 and saved.data.channels == 3
    module = DiffusionModule(OmegaConf.to_container(saved))
    assert module.model.y_embed.num_embeddings == 5  # 4 classes + the null class
    assert Image.open(summary["grid"]).size == (2 * 65 + 1, 65 + 1)


def test_hparams_and_their_metrics_read_back_from_the_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from lightning_modules.callbacks import HPARAM_KEYS

    args = {"train.max_steps": 3, "run.seed": 7, "eval.fid_samples": 3, "eval.fid_features": "tiny",
            "eval.fid_ref_max": 4, "model.attention.options.topk": 3}
    summary = fit(tiny_config(tmp_path, "hp", "llsa", **args), progress=False)
    events = EventAccumulator(str(tmp_path / "hp" / "tb"))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    values = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert set(values) == set(HPARAM_KEYS)
    assert values["model.attention.name"] == "llsa" and values["run.seed"] == 7
    assert values["model.attention.options.topk"] == 3 and values["model.attention.options.levels"] == "default"
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert metrics == {"hparams/fid", "hparams/tokens_per_s", "hparams/peak_mem_gb"}
    (fid_point,) = events.Scalars("hparams/fid")
    assert fid_point.value == pytest.approx(summary["fid"], rel=1e-6)
    assert events.Scalars("hparams/tokens_per_s")[0].value == pytest.approx(
        summary["throughput"]["perf/tokens_per_s"], rel=1e-6)


def test_small_samples_are_drawn_as_squares_of_pixels(tmp_path):
    images = torch.rand(4, 1, 16, 16)
    grid = save_grid(images, tmp_path / "g.png")
    # 2x2 cells of 64 pixels (16 x 4) with 1-pixel padding
    assert grid.shape[-2:] == (131, 131) and Image.open(tmp_path / "g.png").size == (131, 131)
    cell = grid[0, 1:65, 1:65]
    assert torch.equal(cell, images[0, 0].repeat_interleave(4, 0).repeat_interleave(4, 1))
    assert save_grid(torch.rand(4, 3, 64, 64), tmp_path / "h.png").shape[-2:] == (131, 131)
