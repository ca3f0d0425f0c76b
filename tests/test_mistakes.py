"""Runs are never mixed or damaged, and every mistake gets one line: `error: ...` on stderr, exit code 2."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import run
from lightning_modules.data import DataNotFoundError, ImageFolderDataset, ImageReadError, find_fashion_mnist

REPO = Path(__file__).resolve().parents[1]
TINY = ["data.name=procedural", "data.resolution=8", "data.batch_size=2", "data.num_workers=0", "model.patch_size=1",
        "train.log_every=1", "train.warmup_perf_steps=0", "eval.fid_samples=0", "eval.grid_size=2",
        "eval.fid_batch_size=2", "flow.sample_steps=1", "model.attention.options.block_size=4",
        "model.attention.options.topk=2", "model.attention.options.backend=torch"]


def tiny(tmp_path, name="r", *extra):
    return ["fit", f"run.out_dir={tmp_path}", f"run.name={name}", *TINY, *extra]


def one_error_line(capsys, *words) -> str:
    """stderr's one line, which starts with `error:` and holds every word, with no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run of the default model with LLSA (its folder is copied by tests that write into it)."""
    out = tmp_path_factory.mktemp("runs")
    assert run.main(tiny(out, "base", "train.max_steps=2")) == 0
    return out / "base"


def copy_run(trained, tmp_path, name="r") -> Path:
    import shutil

    shutil.copytree(trained, tmp_path / name)
    return tmp_path / name


def test_fit_under_an_existing_run_name_is_refused_and_resumes_only_when_asked(trained, tmp_path, capsys):
    rd = copy_run(trained, tmp_path)
    before = snapshot(rd)
    capsys.readouterr()
    assert run.main(tiny(tmp_path, "r", "train.max_steps=3")) == 2
    one_error_line(capsys, str(rd), "train.ckpt_path=last", "run.name=")
    assert snapshot(rd) == before
    # resuming is asked for: the same folder goes on, with settings a resume may change
    assert run.main(tiny(tmp_path, "r", "train.max_steps=3", "train.ckpt_path=last", "eval.grid_size=1",
                         "train.log_every=2", "flow.sample_steps=2")) == 0
    assert torch.load(rd / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 3
    # no second `last-v1.ckpt` beside the first run's
    assert sorted(p.name for p in (rd / "checkpoints").iterdir()) == ["last.ckpt", "step_0000002.ckpt",
                                                                      "step_0000003.ckpt"]


def test_ckpt_path_last_starts_a_folder_that_has_no_checkpoint(tmp_path):
    # what `run.py ablate` leaves before its first attempt, or after one that failed before any checkpoint
    rd = tmp_path / "r"
    rd.mkdir()
    (rd / "STARTED").write_text("{}")
    (rd / "log.txt").write_text("# an earlier attempt\n")
    assert run.main(tiny(tmp_path, "r", "train.max_steps=1", "train.ckpt_path=last")) == 0
    assert (rd / "checkpoints" / "last.ckpt").is_file()
    assert (rd / "log.txt").read_text().startswith("# an earlier attempt\n")


@pytest.mark.parametrize("overrides, words", [
    (["model.size=DiT-S"], ["model.size (DiT-XXS -> DiT-S)"]),
    (["model.attention.options.topk=1"], ["model.attention.options.topk (2 -> 1)"]),
    (["train.lr=0.5", "model.reorder=false"], ["train.lr (0.008 -> 0.5)", "model.reorder (True -> False)"]),
])
def test_a_resume_with_other_settings_is_refused_before_anything_is_written(trained, tmp_path, capsys, overrides,
                                                                            words):
    rd = copy_run(trained, tmp_path)
    before = snapshot(rd)
    capsys.readouterr()
    assert run.main(tiny(tmp_path, "r", "train.max_steps=3", "train.ckpt_path=last", *overrides)) == 2
    one_error_line(capsys, "cannot resume", str(rd / "checkpoints" / "last.ckpt"), *words)
    assert snapshot(rd) == before


def test_a_resume_may_spell_out_an_attention_option_at_its_default(trained, tmp_path):
    copy_run(trained, tmp_path)
    assert run.main(tiny(tmp_path, "r", "train.max_steps=3", "train.ckpt_path=last",
                         "model.attention.options.reweight=true", "model.attention.options.levels=null")) == 0


def test_sampling_with_overrides_that_change_the_model_is_one_line(trained, tmp_path, capsys):
    capsys.readouterr()
    ckpt = trained / "checkpoints" / "last.ckpt"
    assert run.main(["sample", str(ckpt), "--out", str(tmp_path / "s.png"), "model.size=DiT-S"]) == 2
    one_error_line(capsys, str(ckpt), "model.size=DiT-S", "flow.*")


def test_a_resume_with_another_attention_is_refused(tmp_path, capsys):
    common = ["fit", f"run.out_dir={tmp_path}", "run.name=dense", *TINY[:10]]
    assert run.main([*common, "model.attention.name=full", "train.max_steps=1"]) == 0
    before = snapshot(tmp_path / "dense")
    capsys.readouterr()
    assert run.main([*common, "train.max_steps=2", "train.ckpt_path=last", *TINY[10:]]) == 2
    one_error_line(capsys, "model.attention.name (full -> llsa)")
    assert snapshot(tmp_path / "dense") == before


def bad_checkpoints(trained, tmp_path) -> dict[str, Path]:
    good = (trained / "checkpoints" / "last.ckpt").read_bytes()
    files = {"missing": tmp_path / "missing.ckpt", "truncated": tmp_path / "truncated.ckpt",
             "text": tmp_path / "notes.ckpt", "tensor": tmp_path / "tensor.ckpt", "folder": tmp_path / "a.ckpt"}
    files["folder"].mkdir()
    files["truncated"].write_bytes(good[:len(good) // 2])
    files["text"].write_text("not a checkpoint\n")
    torch.save(torch.zeros(3), files["tensor"])
    return files


@pytest.mark.parametrize("kind", ["missing", "truncated", "text", "tensor", "folder"])
def test_bad_checkpoint_files_get_one_line(trained, tmp_path, capsys, kind):
    path = bad_checkpoints(trained, tmp_path)[kind]
    for argv in (["sample", str(path)], ["fid", str(path)], ["picks", str(path)]):
        capsys.readouterr()
        assert run.main(argv) == 2, argv
        one_error_line(capsys, str(path))
    # and as the checkpoint a run resumes from: no run folder is left behind
    capsys.readouterr()
    assert run.main(tiny(tmp_path / "out", "r", f"train.ckpt_path={path}")) == 2
    one_error_line(capsys, str(path), "run.py fit")
    # and as the weights a new run starts from
    assert run.main(tiny(tmp_path / "out", "r", f"train.init_from={path}")) == 2
    one_error_line(capsys, str(path), "run.py fit")
    assert not (tmp_path / "out").exists()


def test_fid_with_no_samples_is_one_line(trained, capsys):
    capsys.readouterr()
    assert run.main(["fid", str(trained / "checkpoints" / "last.ckpt"), "eval.fid_samples=0"]) == 2
    one_error_line(capsys, "eval.fid_samples")


def test_yaml_syntax_error_is_one_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  max_steps: [1, 2\nmodel: {size: DiT-T\n")
    assert run.main([str(path)]) == 2
    one_error_line(capsys, str(path), "not valid YAML", "line 3")
    assert run.main(["fit", str(path), "train.max_steps=3"]) == 2
    one_error_line(capsys, "not valid YAML")
    # in an override's value too
    assert run.main(["fit", "train.betas=[0.9"]) == 2
    one_error_line(capsys, "override 'train.betas=[0.9' is not valid YAML")


def write_png(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)


def images_with_a_truncated_one(folder, count):
    """``count`` PNGs in ``folder``, the last cut in half: its header reads, its pixel data is cut short."""
    for i in range(count):
        write_png(folder / f"{i}.png", i)
    last = folder / f"{count - 1}.png"
    whole = last.read_bytes()
    last.write_bytes(whole[:len(whole) // 2])
    return folder


def test_a_file_that_is_not_an_image_is_named_before_training(tmp_path, capsys):
    images = tmp_path / "images"
    for i in range(4):
        write_png(images / f"{i}.png", i)
    (images / "broken.png").write_bytes(b"\x89PNG but not really")
    assert run.main(["fit", f"run.out_dir={tmp_path / 'runs'}", "data.name=folder", f"data.path={images}",
                     *TINY[1:], "train.max_steps=1"]) == 2
    one_error_line(capsys, str(images / "broken.png"), "delete or replace it")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("workers", [0, 1])
def test_an_image_that_fails_to_decode_is_named_in_one_line(tmp_path, workers):
    images = images_with_a_truncated_one(tmp_path / "images", 3)
    dataset = ImageFolderDataset(images, 8)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=workers)
    with pytest.raises(DataNotFoundError) as info:
        next(iter(loader))
    assert type(info.value) is ImageReadError
    message = str(info.value)
    assert "\n" not in message and str(images / "2.png") in message and "delete or replace it" in message


def test_a_decode_error_during_training_is_one_line_and_in_log_txt(tmp_path, capsys):
    images = images_with_a_truncated_one(tmp_path / "images", 4)
    assert run.main(["fit", f"run.out_dir={tmp_path}", "run.name=r", "data.name=folder", f"data.path={images}",
                     *TINY[1:], "data.batch_size=4", "data.num_workers=1", "data.class_labels=false",
                     "train.max_steps=2"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert "Traceback" not in err and len(errors) == 1 and errors[0].startswith("error: cannot read image")
    assert str(images / "3.png") in errors[0]
    assert errors[0] in (tmp_path / "r" / "log.txt").read_text()


def test_fashion_mnist_data_path_without_the_files_is_an_error(tmp_path, capsys):
    installed = tmp_path / "installed"
    installed.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        (installed / name).write_bytes(b"")
    # an installed copy is found without data.path ...
    assert find_fashion_mnist(None, search=(str(installed),), download_root=None) == installed
    # ... but a data.path that does not hold the files is not silently replaced by it
    (tmp_path / "wrong").mkdir()
    with pytest.raises(DataNotFoundError, match="wrong.*does not hold Fashion-MNIST.*train-images-idx3-ubyte.gz"):
        find_fashion_mnist(tmp_path / "wrong", search=(str(installed),), download_root=None)
    assert run.main(["fit", f"run.out_dir={tmp_path}", f"data.path={tmp_path / 'wrong'}"]) == 2
    one_error_line(capsys, str(tmp_path / "wrong"), "data.path=")


@pytest.mark.parametrize("argv", [["help"], ["--help"], ["-h"], ["fit", "--help"], ["fit", "train.max_steps=3", "-h"]])
def test_help_prints_the_usage(capsys, argv):
    assert run.main(argv) == 0
    out = capsys.readouterr().out
    assert "python run.py sample CKPT" in out and "python run.py picks CKPT" in out


@pytest.mark.parametrize("argv, words", [
    (["train"], ["unknown command 'train'", "fit, sample, fid, picks, bench, ablate, table, help"]),
    (["fitt", "train.max_steps=3"], ["unknown command 'fitt'"]),
    (["--dry-run"], ["--dry-run", "run.py help"]),
    (["sample"], ["run.py sample", "ckpt"]),
])
def test_mistyped_commands_list_the_valid_ones(capsys, argv, words):
    assert run.main(argv) == 2
    line = one_error_line(capsys, *words)
    assert "does not exist" not in line


GRID = """
overrides:
  data.name: procedural
  data.resolution: 8
  train.max_steps: 1
rows:
  - {label: full, set: {model.attention.name: full}}
  - {label: sparse, set: {model.attention.name: llsa, model.attention.options.topk: 2}}
"""


def test_ablate_checks_every_runs_config_before_the_first_starts(tmp_path, capsys):
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID)
    out = tmp_path / "runs"
    for extra in (["--dry-run"], []):
        capsys.readouterr()
        assert run.main(["ablate", str(grid), "train.max_step=5", "--out", str(out), "--gpus", "0", *extra]) == 2
        one_error_line(capsys, "run g-full of grid g", "train.max_step", "max_steps")
        assert not out.exists()
    # a bad value in one row only
    grid.write_text(GRID.replace("topk: 2", "topk: 0"))
    assert run.main(["ablate", str(grid), "--out", str(out), "--dry-run"]) == 2
    one_error_line(capsys, "run g-sparse of grid g", "topk")
    # a value left to the command line (`???`) is checked once given, not before
    grid.write_text(GRID.replace("data.name: procedural", "data.name: folder\n  data.path: ???"))
    assert run.main(["ablate", str(grid), "--out", str(out), "--dry-run"]) == 0
    assert "data.path=..." in capsys.readouterr().out


def test_table_without_runs_says_where_it_looked(tmp_path, capsys, monkeypatch):
    grid = tmp_path / "g.yaml"
    grid.write_text(GRID)
    monkeypatch.chdir(tmp_path)
    assert run.main(["table", str(grid)]) == 2
    one_error_line(capsys, str(tmp_path / "runs"), "g-full", "--out")
    assert not (tmp_path / "runs").exists()
    (tmp_path / "elsewhere" / "g-full").mkdir(parents=True)
    assert run.main(["table", str(grid), "--out", str(tmp_path / "elsewhere")]) == 0


def test_log_txt_holds_the_loss_the_summary_and_the_end(tmp_path):
    assert run.main(tiny(tmp_path, "r", "train.max_steps=3", "train.log_every=2", "eval.fid_samples=3",
                         "eval.fid_features=tiny", "eval.fid_ref_max=4")) == 0
    text = (tmp_path / "r" / "log.txt").read_text()
    assert re.search(r"step 2: train/loss \d+\.\d{4}", text) and "step 1: train/loss" not in text
    for words in ("Final FID at step 3:", "pixel tokens/s", "ms/step", "Checkpoint: " + str(tmp_path / "r"),
                  "Samples: "):
        assert words in text, words


def test_readme_example_runs_without_a_gpu_and_says_to_activate_the_venv():
    readme = (REPO / "README.md").read_text()
    example = readme.split("## Use it in your model", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert 'device="cuda"' not in example and "torch.cuda.is_available()" in example
    assert ". .venv/bin/activate" in readme.split("## Training, sampling, ablations", 1)[1].split("```", 1)[0]
