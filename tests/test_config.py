"""Config schema: defaults, YAML files under configs/, overrides, and errors that name the key."""
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

import run
from lightning_modules.config import Config, ConfigError, is_run_config, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def run_configs():
    """Every YAML under configs/ that is a run config (other formats, e.g. ablation grids, are skipped)."""
    paths = sorted(CONFIGS.rglob("*.yaml")) + sorted(CONFIGS.rglob("*.yml"))
    return [p for p in paths if is_run_config(yaml.safe_load(p.read_text()))]


def test_default_yaml_is_the_embedded_default():
    written = OmegaConf.load(CONFIGS / "default.yaml")
    assert OmegaConf.to_container(written) == OmegaConf.to_container(OmegaConf.structured(Config))


def test_there_are_experiment_configs():
    names = {p.name for p in run_configs()}
    assert {"default.yaml", "ffhq32_full_pretrain.yaml", "ffhq128_llsa_finetune.yaml", "ffhq128_full_finetune.yaml",
            "ffhq256_llsa.yaml", "fmnist64_dits.yaml"} <= names


@pytest.mark.parametrize("path", run_configs(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_loads(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    # what the file sets is what the config holds
    for section, values in raw.items():
        for key, value in (values or {}).items():
            if not isinstance(value, dict):
                assert cfg[section][key] == value, f"{path.name}: {section}.{key}"


def test_overrides_apply_in_order_after_the_file(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("train:\n  max_steps: 7\nmodel:\n  attention:\n    name: llsa\n    options: {topk: 4}\n")
    cfg = load_config(path, ["model.attention.options.topk=16", "train.lr=3e-4", "train.betas=[0.9,0.95]"])
    assert cfg.train.max_steps == 7
    assert cfg.model.attention.options.topk == 16
    assert cfg.train.lr == pytest.approx(3e-4)
    assert list(cfg.train.betas) == [0.9, 0.95]
    assert cfg.data.name == "fashion_mnist"  # untouched default


def test_options_belong_to_the_attention_they_were_written_for(tmp_path):
    """The default's LLSA options do not follow a switch to another attention, from a file or an override;
    options given beside the name apply on top, wherever they stand in the list; a stored config is whole."""
    default = OmegaConf.structured(Config).model.attention
    assert default.name == "llsa" and default.options
    assert load_config(None, ["model.attention.name=full"]).model.attention.options == {}
    late_name = load_config(None, ["model.attention.options.topk=4", "model.attention.name=vsa"]).model.attention
    assert late_name.name == "vsa" and late_name.options == {"topk": 4}
    # not naming the attention keeps the default's options and changes one
    assert load_config(None, ["model.attention.options.topk=3"]).model.attention.options == {**default.options,
                                                                                               "topk": 3}
    path = tmp_path / "x.yaml"
    path.write_text("model:\n  attention:\n    name: llsa\n")
    assert load_config(path).model.attention.options == {}
    from lightning_modules.config import from_container

    assert from_container({"model": {"attention": {"name": "llsa", "options": {}}}}).model.attention.options == {}


@pytest.mark.parametrize("override, words", [
    ("train.max_stepz=3", ["train.max_stepz", "max_steps"]),
    ("foo.bar=1", ["foo", "train"]),
    ("train.max_steps=abc", ["train.max_steps", "abc"]),
    ("model.attention.name=nope", ["model.attention.name", "nope", "llsa"]),
    ("model.attention.options.topkk=3", ["model.attention.options", "topkk"]),
    ("model.attention.options.topk=0", ["model.attention.options", "topk"]),
    ("data.resolution=31", ["data.resolution", "model.patch_size"]),
    ("model.size=DiT-XXL", ["model.size", "DiT-S"]),
    ("data.name=folder", ["data.path"]),
    ("model.num_classes=-1", ["model.num_classes", ">= 0"]),
    ("flow.sampler=rk4", ["flow.sampler", "heun"]),
    ("train.ema_decay=1.5", ["train.ema_decay"]),
    ("eval.fid_features=clip", ["eval.fid_features", "fid_helper"]),
    ("train.max_steps", ["key=value"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    for word in words:
        assert word in str(info.value)


def test_classes_need_labels():
    with pytest.raises(ConfigError, match="data.class_labels"):
        load_config(None, ["data.class_labels=false", "model.num_classes=10"])


def test_bad_key_in_a_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  resolutoin: 64\n")
    with pytest.raises(ConfigError, match=r"data\.resolutoin.*bad\.yaml"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cli_reports_config_errors_without_traceback(capsys):
    assert run.main(["fit", "train.max_steps=-1"]) == 2
    err = capsys.readouterr().err
    assert "train.max_steps" in err and "Traceback" not in err
