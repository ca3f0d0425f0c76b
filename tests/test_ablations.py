"""Ablation grids: expansion and names, every shipped grid, the runner (skip, failure, GPU pool), the table."""
import csv
import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from ablations.grid import main_ablate
from ablations.runs import command_for, run_state
from ablations.schema import GridError, format_value, load_grid
from ablations.table import main_table, read_scalars

REPO = Path(__file__).resolve().parents[1]
GRIDS = sorted((REPO / "configs" / "ablations").glob("*.yaml"))

# Stands in for `run.py fit`: waits `fake.sleep` seconds, records its call, writes config.yaml, exits with
# `fake.exit` (default 0).
FAKE_TRAINER = r"""
import json, os, sys, time
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
time.sleep(float(args.get("fake.sleep", "0")))
run_dir = os.path.join(args["run.out_dir"], args["run.name"])
os.makedirs(run_dir, exist_ok=True)
with open(os.path.join(args["run.out_dir"], "calls.txt"), "a") as f:
    f.write(args["run.name"] + "\n")
with open(os.path.join(run_dir, "seen.json"), "w") as f:
    json.dump({"args": args, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}, f)
with open(os.path.join(run_dir, "config.yaml"), "w") as f:
    f.write("\n".join(f"{k}: {v}" for k, v in args.items()))
print("fake training", args["run.name"])
sys.exit(int(args.get("fake.exit", "0")))
"""
RUNNER = f"{shlex.quote(sys.executable)} -c {shlex.quote(FAKE_TRAINER)}"


def write_grid(tmp_path: Path, text: str, name: str = "demo") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return path


ROWS_GRID = """
overrides:
  train.max_steps: 10
  model.attention.name: llsa
  train.lr: 1e-4
rows:
  - label: Full attention
    set: {model.attention.name: full}
    paper: {fid: 24.91}
  - label: "+ KV reweighting (L=2)"
    set: {model.attention.options.levels: 2, train.max_steps: 20}
  - label: other
    name: Custom Name
table:
  columns: ["val/fid (last)", "perf/tokens_per_s (median)"]
"""


def test_rows_expand_in_order_with_readable_names(tmp_path):
    grid = load_grid(write_grid(tmp_path, ROWS_GRID), extra={"train.max_steps": 5})
    assert grid.name == "demo"
    assert [r.name for r in grid.runs] == ["demo-full-attention", "demo-kv-reweighting-l-2", "demo-custom-name"]
    assert [r.label for r in grid.runs] == ["Full attention", "+ KV reweighting (L=2)", "other"]
    full, l2, other = grid.runs
    # precedence: overrides < row set < command-line extras
    assert full.overrides["model.attention.name"] == "full"
    assert l2.overrides["model.attention.name"] == "llsa"
    assert l2.overrides["model.attention.options.levels"] == 2
    assert [r.overrides["train.max_steps"] for r in grid.runs] == [5, 5, 5]
    assert full.overrides["train.lr"] == pytest.approx(1e-4)
    assert full.varied == {"model.attention.name": "full"} and other.varied == {}
    assert full.paper == {"fid": 24.91} and l2.paper == {}
    assert [c.key for c in grid.table.columns] == ["fid", "tokens_per_s"]
    assert grid.table.plot == ("tokens_per_s", "fid")


def test_axes_expand_as_cartesian_product(tmp_path):
    grid = load_grid(write_grid(tmp_path, """
name: sweep
overrides: {train.max_steps: 10}
axes:
  model.attention.options.topk: [8, 16]
  model.reorder: [true, false]
  flow.timestep_sampling: [logit_normal]
"""))
    assert [r.name for r in grid.runs] == [
        "sweep-topk8-reorder-on-timestep_sampling-logit_normal",
        "sweep-topk8-reorder-off-timestep_sampling-logit_normal",
        "sweep-topk16-reorder-on-timestep_sampling-logit_normal",
        "sweep-topk16-reorder-off-timestep_sampling-logit_normal",
    ]
    assert grid.runs[1].label == "topk=8, reorder=false, timestep_sampling=logit_normal"
    assert grid.runs[2].overrides == {"train.max_steps": 10, "model.attention.options.topk": 16,
                                      "model.reorder": True, "flow.timestep_sampling": "logit_normal"}


@pytest.mark.parametrize("text, message", [
    ("rows: [{label: a}, {label: A}]", "both give run name"),
    ("rows: [{label: a}]\naxes: {x: [1]}", "exactly one of"),
    ("rows: [{label: a, paper: {fidd: 1}}]", "not table column keys"),
    ("rows: [{label: a, sett: {x: 1}}]", "unknown key"),
    ("axes: {x: []}", "non-empty list"),
    ("rows: [{label: a}]\ntable: {columns: ['val/fid (avg)']}", "reduce='avg'"),
    ("rows: [{label: '+++'}]", "add `name:`"),
    ("rows: [{label: a, set: {x: ???}}]", "not valid YAML"),
    ("rows: [{label: a, set: {train.init_from: '${ckpt}'}}]", "names no input of this grid"),
    ("inputs: {ckpt: a}\nrows: [{label: a}]", "declared but no value uses them"),
    ("inputs: {ckpt: a}\nrows: [{label: a, set: {train.init_from: 'runs/${ckpt}/last.ckpt'}}]", "whole value"),
    ("inputs: {data.path: a}\nrows: [{label: a, set: {x: '${data.path}'}}]", "without dots"),
    ("inputs: {ckpt: [a, b]}\nrows: [{label: a, set: {train.init_from: '${ckpt}'}}]", "single value"),
])
def test_bad_grids_say_what_to_change(tmp_path, text, message):
    with pytest.raises(GridError, match=re.escape(message)):
        load_grid(write_grid(tmp_path, text))


@pytest.mark.parametrize("value", [None, True, False, 3, 1e-4, 2.0, 1e20, "full", "1e-4", "true", "a b: c",
                                   "${train.max_steps}", "???", [8, 16], {"a": 1}])
def test_override_values_read_back_unchanged(value):
    text = format_value(value)
    assert OmegaConf.to_container(OmegaConf.from_dotlist([f"k={text}"]))["k"] == value


def resolved(grid, run, out: Path):
    """The config the trainer builds for ``run``: the grid's base file, then exactly its key=value arguments."""
    from lightning_modules.config import load_config

    return load_config(grid.base, [a for a in command_for(grid, run, out, runner=[]) if "=" in a])


@pytest.mark.parametrize("path", GRIDS, ids=[p.stem for p in GRIDS])
def test_every_grid_file_expands(path, tmp_path):
    grid = load_grid(path)
    names = [r.name for r in grid.runs]
    assert grid.runs and len(set(names)) == len(names)
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9._-]*", n) for n in names)
    if path.stem.endswith("_small"):
        # a fair comparison: every run of a small grid trains the same number of steps
        assert len({resolved(grid, r, tmp_path).train.max_steps for r in grid.runs}) == 1
        assert all("???" not in map(str, r.overrides.values()) for r in grid.runs)
    else:
        assert all(r.overrides.get("data.path") == "???" for r in grid.runs)
    from llsa.attention import ATTENTIONS, options_for

    for run in grid.runs:
        options = {k.rsplit(".", 1)[-1]: v for k, v in run.overrides.items()
                   if k.startswith("model.attention.options.")}
        name = run.overrides.get("model.attention.name")
        assert name in ("full", "vsa", "sla", "llsa"), run.name
        if name in ATTENTIONS:
            options_for(name, **options)


def user_values(path: Path, tmp_path: Path) -> dict | None:
    """What the user adds to ``run.py ablate`` for a paper-size grid: the data folder and every input."""
    if path.stem.endswith("_small"):
        return None
    return {"data.path": str(tmp_path), **{name: str(tmp_path / f"{name}.ckpt") for name in load_grid(path).inputs}}


@pytest.mark.parametrize("path", GRIDS, ids=[p.stem for p in GRIDS])
def test_every_run_is_a_valid_trainer_config(path, tmp_path):
    grid = load_grid(path, extra=user_values(path, tmp_path))
    for run in grid.runs:
        # exactly the arguments the trainer gets: unknown keys, bad types and bad settings raise
        cfg = resolved(grid, run, tmp_path)
        for key, value in run.varied.items():
            assert OmegaConf.select(cfg, key) == value, (run.name, key)


@pytest.mark.parametrize("path", [p for p in GRIDS if p.stem.startswith("table2")],
                         ids=lambda p: p.stem)
def test_baselines_get_llsa_key_budget(path, tmp_path):
    from llsa import keys_per_query

    try:
        from llsa.attention.budget import matched_topk
    except ImportError:
        matched_topk = None

    def opt_budget(opt):
        return {k: opt[k] for k in ("block_size", "topk", "levels", "enrich_levels")}

    grid = load_grid(path, extra={"data.path": str(tmp_path)} if not path.stem.endswith("_small") else None)
    by_res = {}
    for run in grid.runs:
        if run.seed in (None, 0):
            by_res.setdefault(resolved(grid, run, tmp_path).data.resolution, []).append(run.overrides)
    for res, runs in by_res.items():
        (llsa,) = [o for o in runs if o["model.attention.name"] == "llsa"]
        opt = {k.rsplit(".", 1)[-1]: v for k, v in llsa.items() if k.startswith("model.attention.options.")}
        keys = keys_per_query(res * res, opt["block_size"], opt["topk"], opt["levels"], opt["enrich_levels"])
        for o in runs:
            if o["model.attention.name"] in ("vsa", "sla"):
                assert o["model.attention.options.topk"] * o["model.attention.options.block_size"] == keys, res
                if matched_topk is not None:
                    assert o["model.attention.options.topk"] == matched_topk(res * res, **opt_budget(opt)), res


PAPER_GRIDS = [p for p in GRIDS if not p.stem.endswith("_small")]


@pytest.mark.parametrize("path", PAPER_GRIDS, ids=[p.stem for p in PAPER_GRIDS])
def test_paper_grids_fine_tune_each_resolution_from_its_own_checkpoint_with_the_papers_ema(path, tmp_path):
    from lightning_modules.config import load_config

    experiments = sorted((REPO / "configs" / "experiments").glob("ffhq*.yaml"))
    ema = {load_config(p).train.ema_decay for p in experiments}
    assert len(ema) == 1
    grid = load_grid(path, extra=user_values(path, tmp_path))
    start = {}
    for run in grid.runs:
        cfg = resolved(grid, run, tmp_path)
        assert cfg.train.ema_decay in ema, run.name
        start.setdefault(cfg.data.resolution, set()).add(cfg.train.init_from)
    # one checkpoint per resolution, each an input of its own given on the command line
    assert all(len(paths) == 1 for paths in start.values()), start
    paths = [p for paths in start.values() for p in paths]
    assert len(set(paths)) == len(paths) == len(grid.inputs)
    assert set(paths) == {str(tmp_path / f"{name}.ckpt") for name in grid.inputs}


RESOLUTIONS_GRID = """
inputs:
  init_32: ???
  init_64: ???
  unused_default: 3
overrides:
  train.max_steps: 3
  train.warmup_steps: "${unused_default}"
rows:
  - {label: a, set: {data.resolution: 32, train.init_from: "${init_32}"}}
  - {label: b, set: {data.resolution: 64, train.init_from: "${init_64}"}}
  - label: c
    set:
      data.resolution: 64
      train.init_from: ${init_64}
"""


def test_inputs_give_each_resolution_its_own_checkpoint_from_the_command_line(tmp_path, capsys):
    path = write_grid(tmp_path, RESOLUTIONS_GRID, name="g")
    grid = load_grid(path, {"init_32": "/ck/32.ckpt", "init_64": "/ck/64.ckpt", "data.path": "/d"})
    assert grid.inputs == {"init_32": "/ck/32.ckpt", "init_64": "/ck/64.ckpt", "unused_default": 3}
    assert [r.overrides["train.init_from"] for r in grid.runs] == ["/ck/32.ckpt", "/ck/64.ckpt", "/ck/64.ckpt"]
    assert grid.runs[0].overrides["train.warmup_steps"] == 3 and "init_32" not in grid.runs[0].overrides
    assert grid.runs[1].varied == {"data.resolution": 64, "train.init_from": "/ck/64.ckpt"}
    assert grid.runs[1].inputs == {"train.warmup_steps": "unused_default", "train.init_from": "init_64"}
    # a key given itself wins over the input, and is no longer the input's
    run = load_grid(path, {"init_64": "null", "train.init_from": "/x.ckpt"}).runs[1]
    assert run.overrides["train.init_from"] == "/x.ckpt" and "train.init_from" not in run.inputs

    out = tmp_path / "runs"
    argv = [str(path), "--out", str(out), "--gpus", "0", "--runner", RUNNER, "data.path=/d"]
    # an input left at ??? is named as the input, not as the config key it fills
    assert main_ablate(argv + ["init_32=/ck/32.ckpt"]) == 2
    err = capsys.readouterr().err
    assert "init_64=..." in err and "train.init_from" not in err
    # a dot-less key that no grid of the call declares is refused, not passed to the trainer
    assert main_ablate(argv + ["init_32=/a", "init_64=/b", "init_128=/c"]) == 2
    assert "init_128=... is neither a config key" in capsys.readouterr().err
    assert main_ablate(argv + ["init_32=/ck/32.ckpt", "init_64=null"]) == 0
    seen = {r.name: json.loads((out / r.name / "seen.json").read_text())["args"] for r in grid.runs}
    assert [seen[n]["train.init_from"] for n in ("g-a", "g-b", "g-c")] == ["/ck/32.ckpt", "null", "null"]
    assert all("init_32" not in args and "init_64" not in args for args in seen.values())

    # the table cannot know the command line's inputs: a run's value for them is not a config difference
    from ablations.table import collect

    (out / "g-a" / "config.yaml").write_text("train: {init_from: /ck/32.ckpt}\ndata: {resolution: 32}\n")
    (out / "g-b" / "config.yaml").write_text("train: {init_from: null}\ndata: {resolution: 32}\n")
    status = {r["run"]: r["status"] for r in collect(load_grid(path), out)}
    assert status["g-a"] == "done" and status["g-b"] == "done; config differs: data.resolution=32"


RUNNER_GRID = """
overrides: {train.max_steps: 3}
rows:
  - {label: a, set: {model.attention.name: full}}
  - {label: bad, set: {model.attention.name: llsa, fake.exit: 3}}
  - {label: c, set: {model.attention.name: llsa}}
"""


def _calls(out: Path) -> list[str]:
    path = out / "calls.txt"
    return path.read_text().split() if path.exists() else []


def test_failed_run_is_reported_and_the_rest_go_on_then_finished_runs_are_skipped(tmp_path, capsys):
    grid = write_grid(tmp_path, RUNNER_GRID, name="g")
    out = tmp_path / "runs"
    argv = [str(grid), "--out", str(out), "--gpus", "0", "--runner", RUNNER, "data.path=/x"]
    assert main_ablate(argv) == 1
    printed = capsys.readouterr().out
    assert sorted(_calls(out)) == ["g-a", "g-bad", "g-c"]
    assert "FAILED (exit 3)" in printed and str(out / "g-bad" / "log.txt") in printed
    assert "3 runs, 0 skipped (finished or shared), 2 done, 1 failed" in printed
    assert "fake training g-bad" in (out / "g-bad" / "log.txt").read_text()
    assert json.loads((out / "g-bad" / "FAILED").read_text())["exit_code"] == 3
    assert (out / "g-a" / "DONE").is_file() and (out / "g-c" / "DONE").is_file()
    seen = json.loads((out / "g-a" / "seen.json").read_text())["args"]
    assert seen["data.path"] == "/x" and seen["model.attention.name"] == "full" and seen["train.max_steps"] == "3"

    # second pass: finished runs are skipped, the failed one resumes in its folder, keeping its log
    (out / "calls.txt").unlink()
    assert main_ablate(argv) == 1
    assert _calls(out) == ["g-bad"]
    assert (out / "g-bad" / "log.txt").read_text().count("fake training g-bad") == 2
    assert json.loads((out / "g-bad" / "seen.json").read_text())["args"]["train.ckpt_path"] == "last"
    assert not list(out.glob("*.prev-*"))
    assert "2 skipped (finished or shared)" in capsys.readouterr().out


def test_no_run_starts_after_start_until_and_the_next_call_trains_the_rest(tmp_path, capsys):
    grid = write_grid(tmp_path, "overrides: {train.max_steps: 3}\naxes: {train.lr: [0.1, 0.2, 0.3]}\n", name="g")
    out = tmp_path / "runs"
    argv = [str(grid), "--out", str(out), "--gpus", "0", "--runner", RUNNER]
    # one run at a time, each 1 s: only the first starts before 0.5 s have passed
    assert main_ablate(argv + ["fake.sleep=1", "--start-until", "0.5"]) == 0
    printed = capsys.readouterr().out
    assert len(_calls(out)) == 1
    assert "1 done, 0 failed, 2 not started (--start-until 0.5 s had passed)" in printed
    assert "not started, for the next call:" in printed
    (out / "calls.txt").unlink()
    assert main_ablate(argv + ["fake.sleep=1"]) == 0
    assert len(_calls(out)) == 2 and "1 skipped (finished or shared), 2 done, 0 failed\n" in capsys.readouterr().out
    assert main_ablate(argv + ["--start-until", "-1"]) == 2
    assert "--start-until must be >= 0" in capsys.readouterr().err


def test_hand_made_finished_run_is_skipped_and_changed_overrides_rerun(tmp_path):
    grid = load_grid(write_grid(tmp_path, RUNNER_GRID, name="g"))
    out = tmp_path / "runs"
    a, bad, c = grid.runs
    (out / a.name).mkdir(parents=True)
    overrides = {k: format_value(v) for k, v in a.overrides.items()}
    (out / a.name / "DONE").write_text(json.dumps({"overrides": overrides}))
    (out / c.name).mkdir()
    (out / c.name / "DONE").write_text(json.dumps({"overrides": {**overrides, "train.max_steps": "4"}}))
    # a folder this runner never started is not resumed either
    (out / bad.name).mkdir()
    assert [run_state(r, out) for r in grid.runs] == ["done", "stale", "stale"]
    assert main_ablate([str(grid.path), "--out", str(out), "--gpus", "0", "--runner", RUNNER]) == 1
    assert sorted(_calls(out)) == ["g-bad", "g-c"]
    assert (out / "g-c.prev-1" / "DONE").is_file() and (out / "g-bad.prev-1").is_dir()
    assert [run_state(r, out) for r in grid.runs] == ["done", "failed", "done"]


def test_two_grids_in_one_call_train_a_repeated_run_once(tmp_path, capsys):
    first = write_grid(tmp_path, """
overrides: {train.max_steps: 3}
rows:
  - {label: small, set: {data.resolution: 16, model.attention.name: full}}
  - {label: big, set: {data.resolution: 64, model.attention.name: full}}
""", name="g1")
    second = write_grid(tmp_path, """
overrides: {train.max_steps: 3, model.attention.name: full}
rows:
  - {label: same, set: {data.resolution: 64}}
  - {label: other, set: {data.resolution: 32}}
""", name="g2")
    out = tmp_path / "runs"
    argv = [str(first), str(second), "--out", str(out), "--gpus", "0", "--runner", RUNNER, "data.path=/x"]
    assert main_ablate(argv) == 0
    printed = capsys.readouterr().out
    # largest images first; g2-same repeats g1-big, so it is a link, not a fourth training
    assert _calls(out) == ["g1-big", "g2-other", "g1-small"]
    assert (out / "g2-same").is_symlink() and (out / "g2-same").resolve() == (out / "g1-big").resolve()
    assert (out / "g2-same" / "DONE").is_file()
    assert "g2-same: the same run as g1-big" in printed
    assert "4 runs, 1 skipped (finished or shared), 3 done, 0 failed" in printed

    # a later call of the second grid alone finds the finished run in the folder and links to it again,
    # replacing a link that points elsewhere
    (out / "calls.txt").unlink()
    (out / "g2-same").unlink()
    (out / "g2-same").symlink_to("g1-small", target_is_directory=True)
    assert main_ablate([str(second), "--out", str(out), "--gpus", "0", "--runner", RUNNER, "data.path=/x"]) == 0
    assert _calls(out) == [] and (out / "g2-same").resolve() == (out / "g1-big").resolve()
    # a changed override is a different run: trained in a folder of its own
    assert main_ablate([str(second), "--out", str(out), "--gpus", "0", "--runner", RUNNER, "data.path=/y"]) == 0
    assert sorted(_calls(out)) == ["g2-other", "g2-same"]
    assert not (out / "g2-same").is_symlink() and (out / "g2-same.prev-1").is_symlink()
    assert (out / "g1-big" / "DONE").is_file()


def test_missing_required_value_is_refused(tmp_path, capsys):
    grid = write_grid(tmp_path, "overrides:\n  data.path: ???\nrows: [{label: a}]", name="g")
    out = tmp_path / "runs"
    assert main_ablate([str(grid), "--out", str(out), "--gpus", "0", "--runner", RUNNER]) == 2
    assert "data.path=..." in capsys.readouterr().err
    assert not out.exists()
    assert main_ablate([str(grid), "--out", str(out), "--gpus", "0", "--runner", RUNNER, "data.path=/d"]) == 0


def test_one_run_per_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    grid = write_grid(tmp_path, "rows: [{label: a}, {label: b}, {label: c}, {label: d}]", name="g")
    out = tmp_path / "runs"
    assert main_ablate([str(grid), "--out", str(out), "--gpus", "2", "--runner", RUNNER]) == 0
    gpus = [json.loads((out / f"g-{x}" / "seen.json").read_text())["gpu"] for x in "abcd"]
    assert set(gpus) <= {"5", "7"}
    assert main_ablate([str(grid), "--out", str(out), "--gpus", "3", "--runner", RUNNER]) == 2


TABLE_GRID = """
description: test table
rows:
  - {label: Sparse, name: sparse, set: {model.attention.name: llsa}, paper: {fid: 24.37, throughput: 436.4}}
  - {label: Gone, name: gone}
  - {label: Full, name: full, set: {model.attention.name: full}, paper: {fid: 24.91}}
table:
  label: attention
  columns:
    - {key: fid, tag: val/fid, reduce: last, header: FID}
    - {key: throughput, tag: perf/tokens_per_s, reduce: median, scale: 1.0e-3, header: kilo tokens/s}
    - {key: attn, config: model.attention.name}
  plot: {x: throughput, y: fid}
"""


def _write_events(run_dir: Path, fids: dict[int, float], throughput: np.ndarray) -> None:
    from torch.utils.tensorboard import SummaryWriter

    # two event files in nested folders, as a restarted Lightning run leaves them
    first = SummaryWriter(str(run_dir / "logs" / "version_0"))
    second = SummaryWriter(str(run_dir / "logs" / "version_1"))
    for i, value in enumerate(throughput):
        (first if i % 2 else second).add_scalar("perf/tokens_per_s", float(value), i)
    # written out of step order: `last` means the highest step, not the last written
    for step, value in sorted(fids.items(), reverse=True):
        first.add_scalar("val/fid", value, step)
    first.close()
    second.close()


def test_table_from_tensorboard_events(tmp_path, capsys):
    grid = write_grid(tmp_path, TABLE_GRID, name="t")
    out = tmp_path / "runs"
    rng = np.random.default_rng(0)
    # more points than TensorBoard's default reservoir of 10,000 keeps
    tput_sparse = rng.uniform(3e5, 5e5, size=10_500).astype(np.float32)
    tput_full = rng.uniform(1e5, 2e5, size=1_200).astype(np.float32)
    _write_events(out / "t-sparse", {100: 40.0, 300: 30.5, 200: 35.0}, tput_sparse)
    _write_events(out / "t-full", {300: 28.25}, tput_full)
    (out / "t-sparse" / "DONE").write_text("{}")
    (out / "t-sparse" / "config.yaml").write_text("model: {attention: {name: llsa}}\n")
    (out / "t-full" / "config.yaml").write_text("model: {attention: {name: vsa}}\n")

    assert len(read_scalars(out / "t-sparse")["perf/tokens_per_s"]) == 10_500
    assert main_table([str(grid), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    folder = out / "t"
    assert (folder / "table.md").read_text() in printed
    png = folder / "fid_vs_throughput.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = list(csv.DictReader((folder / "table.csv").open()))
    assert [r["label"] for r in rows] == ["Sparse", "Gone", "Full"]
    sparse, gone, full = rows
    assert float(sparse["fid_mean"]) == pytest.approx(30.5) and sparse["fid_std"] == "" and sparse["fid_n"] == "1"
    assert float(sparse["throughput_mean"]) == pytest.approx(np.median(tput_sparse.astype(np.float64)) * 1e-3,
                                                             rel=1e-9)
    assert float(full["throughput_mean"]) == pytest.approx(np.median(tput_full.astype(np.float64)) * 1e-3, rel=1e-9)
    assert float(full["fid_mean"]) == pytest.approx(28.25)
    assert sparse["fid_paper"] == "24.37" and full["fid_paper"] == "24.91" and full["throughput_paper"] == ""
    assert gone["fid_mean"] == gone["throughput_mean"] == gone["attn"] == "missing" and gone["status"] == "missing"
    assert gone["fid_n"] == "0"
    assert sparse["attn"] == "llsa" and sparse["status"] == "done"
    assert full["status"] == "unfinished; config differs: model.attention.name=vsa"
    per_run = list(csv.DictReader((folder / "runs.csv").open()))
    assert [r["run"] for r in per_run] == ["t-sparse", "t-gone", "t-full"]

    md = (folder / "table.md").read_text().splitlines()
    header = next(line for line in md if line.startswith("| attention"))
    assert header.split(" | ")[:6] == ["| attention", "n", "FID", "FID (paper)", "kilo tokens/s",
                                       "kilo tokens/s (paper)"]
    gone_line = next(line for line in md if line.startswith("| Gone"))
    assert gone_line.count("missing") == 4
    assert next(line for line in md if line.startswith("| Sparse")).startswith("| Sparse | 1 | 30.50 | 24.37 |")
    # one run per row: no standard deviations, so no differences to mark
    assert not any("two standard errors" in line for line in md)


SEEDS_GRID = """
seeds: 3
overrides: {train.max_steps: 3}
rows:
  - {label: A, name: a, set: {model.attention.name: full}}
  - {label: B, name: b, set: {model.attention.name: llsa}}
  - {label: C, name: c, set: {model.attention.name: vsa}}
table:
  columns:
    - {key: fid, tag: val/fid, reduce: last, header: FID}
    - {key: throughput, tag: perf/tokens_per_s, reduce: median, header: tokens/s}
  plot: {x: throughput, y: fid}
  curve: val/fid_curve
"""


def test_seeds_give_a_run_each_and_the_table_their_mean_spread_and_separated_pairs(tmp_path, capsys):
    from torch.utils.tensorboard import SummaryWriter

    grid_path = write_grid(tmp_path, SEEDS_GRID, name="s")
    grid = load_grid(grid_path)
    assert [r.name for r in grid.runs] == [f"s-{row}-s{k}" for row in "abc" for k in range(3)]
    assert [r.overrides["run.seed"] for r in grid.runs[:3]] == [0, 1, 2] and grid.runs[4].seed == 1
    assert [r.name for r in load_grid(grid_path, seeds=2).runs][:2] == ["s-a-s0", "s-a-s1"]
    with pytest.raises(GridError, match="run.seed"):
        load_grid(grid_path, {"run.seed": 4})
    with pytest.raises(GridError, match="seeds"):
        load_grid(write_grid(tmp_path, "seeds: [1, 1]\nrows: [{label: a}]", name="bad"))

    # A: 10, 11, 12; B: 20, 21, 22 (separated from A); C: 9, 15, 21 (too spread to separate from either)
    fids = {"a": [10.0, 11.0, 12.0], "b": [20.0, 21.0, 22.0], "c": [9.0, 15.0, 21.0]}
    out = tmp_path / "runs"
    for row, values in fids.items():
        for k, value in enumerate(values):
            run_dir = out / f"s-{row}-s{k}"
            writer = SummaryWriter(str(run_dir / "tb"))
            writer.add_scalar("perf/tokens_per_s", 100.0 + k, 1)
            for step, curve in ((100, 2 * value), (300, 1.1 * value), (400, value)):
                writer.add_scalar("val/fid_curve", curve, step)
            writer.add_scalar("val/fid", value, 400)
            writer.close()
            (run_dir / "DONE").write_text("{}")
    assert main_table([str(grid_path), "--out", str(out)]) == 0
    folder = out / "s"
    rows = {r["label"]: r for r in csv.DictReader((folder / "table.csv").open())}
    assert float(rows["A"]["fid_mean"]) == pytest.approx(11.0) and float(rows["A"]["fid_std"]) == pytest.approx(1.0)
    assert float(rows["C"]["fid_std"]) == pytest.approx(6.0) and rows["C"]["fid_n"] == "3"
    assert rows["B"]["status"] == "3 done" and rows["B"]["runs"] == "s-b-s0 s-b-s1 s-b-s2"
    md = (folder / "table.md").read_text()
    assert "| A | 3 | 11.00 ± 1.00 | 101.00 ± 1.00 | 3 done | `s-a-s*` (3) |" in md
    # A - B = -10, standard error sqrt(1/3 + 1/3) = 0.82: separated; A - C = -4, SE 3.5: not
    assert "| (1) A |  | **-10.00** | -4.00 |" in md
    assert "1 of 3 pairs differ by more than two standard errors." in md
    # the curve: 1.1 x the final FID at step 300 = three quarters of 400
    assert "| A | 3 | 300 | 12.10 | 400 | 11.00 | 0.909 |" in md
    for png in ("fid_vs_throughput.png", "val_fid_curve.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pack_runs_several_at_once_on_one_gpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    grid = write_grid(tmp_path, "seeds: 2\nrows: [{label: a}, {label: b}]", name="g")
    out = tmp_path / "runs"
    assert main_ablate([str(grid), "--out", str(out), "--gpus", "1", "--pack", "2", "--runner", RUNNER]) == 0
    seen = [json.loads((out / f"g-{x}-s{k}" / "seen.json").read_text()) for x in "ab" for k in range(2)]
    assert {s["gpu"] for s in seen} == {"3"} and [s["args"]["run.seed"] for s in seen] == ["0", "1", "0", "1"]
    assert main_ablate([str(grid), "--out", str(out), "--pack", "0", "--runner", RUNNER]) == 2


def test_packed_runs_are_recorded_and_the_table_names_them(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    grid = write_grid(tmp_path, "seeds: 2\nrows: [{label: a, set: {model.attention.name: full}}, "
                                "{label: b, set: {model.attention.name: llsa}}]", name="g")
    out = tmp_path / "runs"
    assert main_ablate([str(grid), "--out", str(out), "--gpus", "1", "--pack", "2", "--runner", RUNNER]) == 0
    assert json.loads((out / "g-a-s0" / "DONE").read_text())["pack"] == 2
    # a resumed run keeps the most it ever shared with; a run trained alone shares nothing
    (out / "g-b-s0" / "DONE").unlink()
    shutil.rmtree(out / "g-b-s1")
    assert main_ablate([str(grid), "--out", str(out), "--gpus", "1", "--pack", "1", "--runner", RUNNER]) == 0
    assert [json.loads((out / f"g-b-s{k}" / "STARTED").read_text())["pack"] for k in (0, 1)] == [2, 1]
    assert main_table([str(grid), "--out", str(out)]) == 0
    md = (out / "g" / "table.md").read_text()
    assert "--pack`): g-a-s0 (2), g-a-s1 (2), g-b-s0 (2). Their throughput" in md
    assert [line.split(",")[3] for line in (out / "g" / "runs.csv").read_text().splitlines()] == \
        ["pack", "2", "2", "2", "1"]


COMMITTED = REPO / "docs" / "results" / "ablation_runs"
COMMITTED_TABLES = sorted(p.parent.name for p in COMMITTED.glob("*/table.md"))


def test_every_small_grid_with_committed_runs_has_its_table_committed():
    grids = {p.stem: load_grid(p) for p in GRIDS if p.stem.endswith("_small")}
    with_runs = {name for name, grid in grids.items() if any((COMMITTED / r.name).exists() for r in grid.runs)}
    assert with_runs and with_runs <= set(COMMITTED_TABLES)


@pytest.mark.parametrize("name", COMMITTED_TABLES)
def test_committed_results_rebuild_from_their_events(tmp_path, name):
    """docs/results.md's tables come from the committed runs (links for runs shared between grids)."""
    import shutil

    runs = COMMITTED
    out = tmp_path / "runs"
    shutil.copytree(runs, out, symlinks=True)
    shutil.rmtree(out / name)
    assert main_table([str(REPO / "configs" / "ablations" / f"{name}.yaml"), "--out", str(out)]) == 0
    assert (out / name / "table.md").read_text() == (runs / name / "table.md").read_text()
    assert (out / name / "table.csv").read_text() == (runs / name / "table.csv").read_text()
    assert (out / name / "runs.csv").read_text() == (runs / name / "runs.csv").read_text()
