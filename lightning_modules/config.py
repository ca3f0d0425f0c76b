"""Typed run configuration: dataclass defaults, then a YAML file, then ``key=value`` overrides.

The dataclass defaults below *are* the embedded default run (``python run.py fit``): class-conditional
Fashion-MNIST at 16x16, a small DiT with LLSA, 600 steps and an FID on 500 samples at the end,
sized so that a fresh clone on a 2-core CPU sets up and finishes in about 8 minutes with recognisable
garments (docs/results.md). YAML files under ``configs/`` only override fields of this schema.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

DATASETS = ("fashion_mnist", "folder", "procedural")
LR_SCHEDULES = ("constant", "cosine", "linear")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PRECISIONS = ("auto", "32-true", "32", "16-mixed", "bf16-mixed", "bf16-true", "16-true", "64-true")
FID_FEATURES = ("auto", "inception", "fid_helper", "tiny")
SECTIONS = ("run", "model", "data", "flow", "train", "eval")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key and what to change."""


@dataclass
class RunConfig:
    name: str = "default"
    out_dir: str = "runs"
    seed: int = 0


@dataclass
class AttentionConfig:
    # any name registered in llsa.attention (full, llsa, vsa, sla, ...)
    name: str = "llsa"
    # keyword options of that attention, checked by llsa.attention.options_for. They belong to the attention
    # they were written for: a YAML file or an override list that names an attention starts from that
    # attention's own defaults, so `model.attention.name=full` does not inherit LLSA's options below.
    # Top-2: the default's 64 tokens make 4 blocks of 16 (the smallest block the GPU kernels take), and each
    # query block picks 2 of them, attending 32 pixel tokens and the 4 block means (the library's top-8
    # would attend every token of so short a sequence).
    options: Dict[str, Any] = field(default_factory=lambda: {"topk": 2})


@dataclass
class ModelConfig:
    size: str = "DiT-XXS"
    # the paper's pixel DiTs use 1; 2 (64 tokens at 16x16) keeps the embedded default within a CPU budget
    patch_size: int = 2
    # resolution whose pixel grid RoPE positions are measured on (None: the run's resolution)
    rope_size: Optional[int] = None
    reorder: bool = True
    # 0 = unconditional; with data.class_labels=true, 0 means "as many as the dataset has"
    num_classes: int = 0
    class_dropout: float = 0.1
    attention: AttentionConfig = field(default_factory=AttentionConfig)


@dataclass
class DataConfig:
    name: str = "fashion_mnist"
    path: Optional[str] = None
    resolution: int = 16
    # None: from the dataset (Fashion-MNIST 1, folders and procedural 3)
    channels: Optional[int] = None
    # labels make a short run's samples recognisable (with flow.cfg_scale); a folder dataset takes them
    # from its subfolders, or set false
    class_labels: bool = True
    batch_size: int = 32
    num_workers: int = 2
    # keep the whole dataset, resized, on the training device as float16 and draw batches there (no loader
    # processes, no host copies); null: on a GPU when that copy fits in resident_max_gb
    resident: Optional[bool] = None
    resident_max_gb: float = 8.0


@dataclass
class FlowConfig:
    # None: n/64 for n x n images with n > 64, else 1 (the paper's rule)
    noise_rescale: Optional[float] = None
    timestep_sampling: str = "uniform"
    shift: float = 1.0
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    sample_steps: int = 20
    sampler: str = "euler"
    # classifier-free guidance at sampling, for class-conditional models (1: none)
    cfg_scale: float = 2.0


@dataclass
class TrainConfig:
    max_steps: int = 600
    # 1e-4 is the paper's; the short embedded default's small model learns fastest near 8e-3, with a warm-up
    # and cosine decay (experiment YAMLs set 1e-4)
    lr: float = 8e-3
    weight_decay: float = 0.01
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # 0 turns clipping off
    grad_clip: float = 1.0
    warmup_steps: int = 50
    # after the warm-up: constant, or cosine / linear decay to lr * lr_final_ratio at max_steps
    lr_schedule: str = "cosine"
    lr_final_ratio: float = 0.0
    # the paper's 0.9999 (with warm-up) would barely move in a few hundred steps; experiment YAMLs set it
    ema_decay: float = 0.999
    # decay warm-up 1 - (1 + step)^(-3/4), capped at ema_decay (diffusers' inv_gamma=1, power=3/4)
    ema_warmup: bool = True
    # auto: bf16-mixed on a GPU, 32-true on the CPU
    precision: str = "auto"
    devices: Any = "auto"
    # more than 1: launch with torchrun or srun (one process per device), see the README
    num_nodes: int = 1
    strategy: str = "auto"
    accelerator: str = "auto"
    log_every: int = 10
    # below max_steps, so that an interrupted default run can resume
    ckpt_every: int = 200
    # "last" resumes from {out_dir}/{name}/checkpoints/last.ckpt when it exists; or a .ckpt path
    ckpt_path: Optional[str] = None
    # checkpoint of a lower-resolution run whose weights start this one
    init_from: Optional[str] = None
    # first steps left out of the throughput numbers (compilation, autotuning, allocator warm-up)
    warmup_perf_steps: int = 5
    # torch.compile the trained model (eval.compile decides for the EMA's sampling) with this mode: null (eager), default,
    # reduce-overhead (CUDA graphs), max-autotune; fuses the norms, RoPE and modulations around attention.
    # auto: default on a GPU for runs of at least 1,000 steps (compiling takes about a minute), else eager
    compile: Optional[str] = "auto"
    # the torch.compile backend (aot_eager traces without generating code: how the CPU tests run it)
    compile_backend: str = "inductor"


@dataclass
class EvalConfig:
    # 0: FID only at the end of training
    fid_every: int = 0
    # 0: no FID at all
    fid_samples: int = 500
    # samples of the FIDs taken every fid_every steps (val/fid_curve); the final FID (val/fid) uses
    # fid_samples, and its first fid_curve_samples samples give the curve's last point. null: fid_samples
    fid_curve_samples: Optional[int] = None
    fid_batch_size: int = 100
    # reference images taken from the training data (None: all of it)
    fid_ref_max: Optional[int] = 500
    # 0: sample grid only at the end of training
    grid_every: int = 0
    grid_size: int = 16
    sample_seed: int = 0
    fid_features: str = "auto"
    # torch.compile the EMA model for FID sampling (thousands of samples: about half the time of eager on an
    # H200, docs/benchmarks.md); sample grids and picks stay eager. auto: the mode train.compile resolves to
    compile: Optional[str] = "auto"


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _names_attention(layer) -> bool:
    return OmegaConf.select(layer, "model.attention.name", default=None) is not None


def _fresh_options(cfg: DictConfig) -> DictConfig:
    """``cfg`` with no attention options: the next layer names the attention, so it starts from that
    attention's own defaults."""
    cfg = cfg.copy()
    cfg.model.attention.options = {}
    return cfg


def _merge(cfg: DictConfig, other, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, other)
    except ConfigKeyError as e:
        key = e.full_key or e.key
        parent = ".".join(str(key).split(".")[:-1])
        valid = _keys_of(cfg, parent)
        raise ConfigError(f"unknown config key `{key}` ({source}); valid keys here: {valid}") from None
    except OmegaConfBaseException as e:
        msg = str(e).split("\n")[0]
        where = f"for `{e.full_key}` " if e.full_key else ""
        raise ConfigError(f"bad value {where}({source}): {msg}") from None


def _keys_of(cfg: DictConfig, dotted: str) -> list[str]:
    node = OmegaConf.select(cfg, dotted) if dotted else cfg
    return sorted(node.keys()) if isinstance(node, DictConfig) else []


def is_run_config(data) -> bool:
    """Whether a YAML mapping looks like a run config (a top-level key among the schema's sections)."""
    return isinstance(data, dict) and any(k in SECTIONS for k in data)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The embedded default, updated by the YAML file ``path`` and then by ``key=value`` ``overrides``.

    Raises :class:`ConfigError` naming the offending key for unknown keys, ill-typed values and
    inconsistent settings (see :func:`validate`).
    """
    cfg = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = OmegaConf.load(path)
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {yaml_problem(err)}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections {SECTIONS}")
        cfg = _merge(_fresh_options(cfg) if _names_attention(loaded) else cfg, loaded, f"in {path}")
    return apply_overrides(cfg, overrides)


def yaml_problem(err: Exception) -> str:
    """A YAML parser's error in one line: what is wrong and where (line and column count from 1)."""
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = " ".join(filter(None, (getattr(err, "problem", None), getattr(err, "context", None))))
    return (what or str(err).splitlines()[0]) + where


def apply_overrides(cfg: DictConfig, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """``cfg`` updated by ``key=value`` strings (omegaconf dotlist syntax), then validated.

    The list is one layer: if any item names the attention, the options start from that attention's
    defaults before any item applies, wherever in the list the name stands."""
    layers = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. train.max_steps=100")
        try:
            layers.append((item, OmegaConf.from_dotlist([item])))
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r} is not valid YAML: {yaml_problem(err)}; quote a string value "
                              "or close its brackets") from None
    if any(_names_attention(value) for _, value in layers):
        cfg = _fresh_options(cfg)
    for item, value in layers:
        cfg = _merge(cfg, value, f"override {item!r}")
    validate(cfg)
    return cfg


def _check(ok: bool, msg: str):
    if not ok:
        raise ConfigError(msg)


def validate(cfg: DictConfig) -> None:
    """Semantic checks the types alone do not catch; each error names the key to change."""
    from llsa.attention import ATTENTIONS, options_for
    from llsa.flow import SAMPLERS, TIMESTEP_SAMPLINGS
    from llsa.models import DIT_SIZES

    m, d, f, t, e = cfg.model, cfg.data, cfg.flow, cfg.train, cfg.eval
    _check(bool(cfg.run.name) and "/" not in cfg.run.name,
           f"`run.name` must be a non-empty folder name without '/', got {cfg.run.name!r}")
    _check(m.size in DIT_SIZES, f"`model.size` must be one of {sorted(DIT_SIZES)}, got {m.size!r}")
    _check(m.patch_size >= 1, f"`model.patch_size` must be >= 1, got {m.patch_size}")
    _check(m.rope_size is None or m.rope_size >= 1, f"`model.rope_size` must be >= 1 or null, got {m.rope_size}")
    _check(m.num_classes >= 0, f"`model.num_classes` must be >= 0, got {m.num_classes}")
    _check(0 <= m.class_dropout < 1, f"`model.class_dropout` must be in [0, 1), got {m.class_dropout}")
    _check(m.attention.name in ATTENTIONS,
           f"`model.attention.name` must be one of {sorted(ATTENTIONS)}, got {m.attention.name!r}")
    try:
        options_for(m.attention.name, **OmegaConf.to_container(m.attention.options))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"`model.attention.options`: {err}") from None

    _check(d.name in DATASETS, f"`data.name` must be one of {DATASETS}, got {d.name!r}")
    _check(d.name != "folder" or d.path is not None,
           "`data.name=folder` needs `data.path`, the folder of images (subfolders = classes)")
    _check(d.resolution >= 1, f"`data.resolution` must be >= 1, got {d.resolution}")
    _check(d.resolution % m.patch_size == 0,
           f"`data.resolution`={d.resolution} is not divisible by `model.patch_size`={m.patch_size}")
    _check(d.channels is None or d.channels in (1, 3), f"`data.channels` must be 1, 3 or null, got {d.channels}")
    _check(d.batch_size >= 1, f"`data.batch_size` must be >= 1, got {d.batch_size}")
    _check(d.num_workers >= 0, f"`data.num_workers` must be >= 0, got {d.num_workers}")
    _check(d.resident_max_gb > 0, f"`data.resident_max_gb` must be > 0, got {d.resident_max_gb}")
    _check(d.class_labels or m.num_classes == 0,
           f"`model.num_classes`={m.num_classes} needs `data.class_labels=true` (or set model.num_classes=0)")

    _check(f.noise_rescale is None or f.noise_rescale > 0,
           f"`flow.noise_rescale` must be > 0 or null (n/64 rule), got {f.noise_rescale}")
    _check(f.timestep_sampling in TIMESTEP_SAMPLINGS,
           f"`flow.timestep_sampling` must be one of {TIMESTEP_SAMPLINGS}, got {f.timestep_sampling!r}")
    _check(f.shift > 0, f"`flow.shift` must be > 0 (1 = no shift), got {f.shift}")
    _check(f.logit_normal_std > 0, f"`flow.logit_normal_std` must be > 0, got {f.logit_normal_std}")
    _check(f.sample_steps >= 1, f"`flow.sample_steps` must be >= 1, got {f.sample_steps}")
    _check(f.sampler in SAMPLERS, f"`flow.sampler` must be one of {SAMPLERS}, got {f.sampler!r}")

    _check(t.max_steps >= 1, f"`train.max_steps` must be >= 1, got {t.max_steps}")
    _check(t.lr > 0, f"`train.lr` must be > 0, got {t.lr}")
    _check(t.weight_decay >= 0, f"`train.weight_decay` must be >= 0, got {t.weight_decay}")
    _check(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
           f"`train.betas` must be two numbers in [0, 1), got {list(t.betas)}")
    _check(t.eps > 0, f"`train.eps` must be > 0, got {t.eps}")
    _check(t.grad_clip >= 0, f"`train.grad_clip` must be >= 0 (0 = off), got {t.grad_clip}")
    _check(t.warmup_steps >= 0, f"`train.warmup_steps` must be >= 0, got {t.warmup_steps}")
    _check(t.lr_schedule in LR_SCHEDULES, f"`train.lr_schedule` must be one of {LR_SCHEDULES}, got {t.lr_schedule!r}")
    _check(0 <= t.lr_final_ratio <= 1, f"`train.lr_final_ratio` must be in [0, 1], got {t.lr_final_ratio}")
    _check(0 <= t.ema_decay < 1, f"`train.ema_decay` must be in [0, 1), got {t.ema_decay}")
    _check(t.precision in PRECISIONS, f"`train.precision` must be one of {PRECISIONS}, got {t.precision!r}")
    _check(t.num_nodes >= 1, f"`train.num_nodes` must be >= 1, got {t.num_nodes}")
    _check(t.log_every >= 1, f"`train.log_every` must be >= 1, got {t.log_every}")
    _check(t.ckpt_every >= 1, f"`train.ckpt_every` must be >= 1, got {t.ckpt_every}")
    _check(t.compile is None or t.compile in COMPILE_MODES,
           f"`train.compile` must be null or one of {COMPILE_MODES}, got {t.compile!r}")
    _check(e.compile is None or e.compile in COMPILE_MODES,
           f"`eval.compile` must be null or one of {COMPILE_MODES}, got {e.compile!r}")
    _check(t.warmup_perf_steps >= 0, f"`train.warmup_perf_steps` must be >= 0, got {t.warmup_perf_steps}")

    _check(e.fid_every >= 0, f"`eval.fid_every` must be >= 0 (0 = only at the end), got {e.fid_every}")
    _check(e.fid_samples == 0 or e.fid_samples >= 2,
           f"`eval.fid_samples` must be 0 (no FID) or >= 2, got {e.fid_samples}")
    _check(e.fid_curve_samples is None or 2 <= e.fid_curve_samples <= max(e.fid_samples, 2),
           f"`eval.fid_curve_samples` must be null or in 2..eval.fid_samples={e.fid_samples}, got {e.fid_curve_samples}")
    _check(e.fid_batch_size >= 1, f"`eval.fid_batch_size` must be >= 1, got {e.fid_batch_size}")
    _check(e.fid_ref_max is None or e.fid_ref_max >= 2, f"`eval.fid_ref_max` must be >= 2 or null, got {e.fid_ref_max}")
    _check(e.grid_every >= 0, f"`eval.grid_every` must be >= 0 (0 = only at the end), got {e.grid_every}")
    _check(e.grid_size >= 1, f"`eval.grid_size` must be >= 1, got {e.grid_size}")
    _check(e.fid_features in FID_FEATURES, f"`eval.fid_features` must be one of {FID_FEATURES}, got {e.fid_features!r}")


def run_dir(cfg: DictConfig) -> Path:
    """The run's folder ``{out_dir}/{name}``."""
    return Path(cfg.run.out_dir) / cfg.run.name


def save_config(cfg: DictConfig, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)


def from_container(data: dict) -> DictConfig:
    """A config rebuilt from a plain dict (e.g. the copy stored in a checkpoint), checked like a file. A stored
    config is complete: its attention options are all the run had, whatever today's defaults are."""
    return _merge(_fresh_options(OmegaConf.structured(Config)), OmegaConf.create(data), "stored config")
