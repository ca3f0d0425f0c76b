"""What ``run.py`` does: fit a config, sample from a checkpoint, score a checkpoint's FID."""
import logging
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from lightning_modules import fid
from lightning_modules.callbacks import (FIDCallback, HParamsCallback, SampleGridCallback, StepCheckpoint,
                                         ThroughputMonitor, save_grid)
from lightning_modules.config import ConfigError, apply_overrides, from_container, run_dir, save_config
from lightning_modules.data import ImageDataModule, build_dataset
from lightning_modules.module import DiffusionModule, resolve_precision, uses_gpu
from lightning_modules.picks import PicksCallback
from lightning_modules.runs import CheckpointError, LossLog, check_start, log_error, log_summary, read_checkpoint

log = logging.getLogger("llsa.run")


def setup_logging(folder: Path | None, rank_zero: bool = True) -> None:
    """Run messages to stderr and, when ``folder`` is given, to ``folder/log.txt``; other ranks only warn."""
    log.setLevel(logging.INFO if rank_zero else logging.WARNING)
    log.propagate = False
    if not any(type(h) is logging.StreamHandler for h in log.handlers):
        log.addHandler(logging.StreamHandler())
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        path = (folder / "log.txt").resolve()
        if not any(getattr(h, "baseFilename", None) == str(path) for h in log.handlers):
            handler = logging.FileHandler(path)
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            log.addHandler(handler)


def prepare(cfg: DictConfig, dataset=None):
    """Build the dataset and fill in what the config leaves to it: ``data.channels`` and, with class labels,
    ``model.num_classes``. Returns ``(resolved config, dataset)``."""
    dataset = dataset if dataset is not None else build_dataset(cfg.data)
    cfg = cfg.copy()
    cfg.data.channels = dataset.channels
    if cfg.data.class_labels:
        n = dataset.num_classes
        if cfg.model.num_classes == 0:
            cfg.model.num_classes = n
        elif cfg.model.num_classes < n:
            raise ConfigError(f"`model.num_classes`={cfg.model.num_classes} but the dataset has {n} classes; "
                              "raise it or set it to 0 (= the dataset's count)")
    return cfg, dataset


def resume_path(cfg: DictConfig) -> str | None:
    """``train.ckpt_path`` with ``"last"`` mapped to the run's ``last.ckpt`` (None, i.e. a fresh start, if absent)."""
    path = cfg.train.ckpt_path
    if path != "last":
        return path
    last = run_dir(cfg) / "checkpoints" / "last.ckpt"
    if last.is_file():
        return str(last)
    log.info("train.ckpt_path=last: no %s yet, starting from scratch", last)
    return None


def build_trainer(cfg: DictConfig, progress: bool = True):
    """The Trainer and its callbacks (throughput first, so that a window of steps closes before an evaluation
    at the same step; hparams after the final FID)."""
    rd = run_dir(cfg)
    t = cfg.train
    throughput = ThroughputMonitor(t.warmup_perf_steps, t.log_every)
    fid_cb = FIDCallback(cfg, Path(cfg.run.out_dir) / "fid_stats", progress=progress)
    grid_cb = SampleGridCallback(cfg, rd / "samples")
    ckpt_cb = StepCheckpoint(rd / "checkpoints", t.ckpt_every)
    callbacks = [throughput, fid_cb, grid_cb, PicksCallback(cfg), HParamsCallback(cfg, throughput, fid_cb), ckpt_cb,
                 LossLog(t.log_every)]
    if progress:
        # the bar reads the logged loss, which waits for the GPU: refresh it only as often as the loss is logged
        callbacks.append(TQDMProgressBar(refresh_rate=t.log_every))
    trainer = L.Trainer(
        max_steps=t.max_steps, max_epochs=-1, accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=resolve_precision(t.precision, uses_gpu(cfg)), gradient_clip_val=t.grad_clip or None,
        log_every_n_steps=t.log_every,
        logger=TensorBoardLogger(save_dir=str(rd), name="", version="tb", default_hp_metric=False),
        callbacks=callbacks, limit_val_batches=0, num_sanity_val_steps=0,
        enable_progress_bar=progress, default_root_dir=str(rd))
    return trainer, throughput, fid_cb, grid_cb


def fit(cfg: DictConfig, dataset=None, progress: bool = True) -> dict:
    """Train the config's run; returns a summary: run folder, final FID, throughput, last checkpoint."""
    # The EMA copy is meant to stay in eval mode; Lightning warns about any module that does.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    cfg, dataset = prepare(cfg, dataset)
    rd = run_dir(cfg)
    # before anything is written: an existing run is never mixed into, a resume must match its checkpoint
    check_start(cfg)
    trainer, throughput, fid_cb, grid_cb = build_trainer(cfg, progress)
    setup_logging(rd if trainer.is_global_zero else None, trainer.is_global_zero)
    if trainer.is_global_zero:
        save_config(cfg, rd / "config.yaml")
    module = DiffusionModule(OmegaConf.to_container(cfg, resolve=True))
    ckpt = resume_path(cfg)
    if cfg.train.init_from and ckpt is None:
        module.init_from(cfg.train.init_from)
        log.info("initialised from the EMA weights of %s", cfg.train.init_from)
    try:
        trainer.fit(module, datamodule=ImageDataModule(cfg.data, dataset, seed=cfg.run.seed), ckpt_path=ckpt)
    except BaseException as err:
        log_error(err)
        raise
    summary = {"run_dir": str(rd), "global_step": trainer.global_step,
               "fid": fid_cb.final(), "fid_history": fid_cb.history,
               "throughput": throughput.summary(), "grid": str(grid_cb.last_path) if grid_cb.last_path else None,
               "last_ckpt": str(rd / "checkpoints" / "last.ckpt"), "is_global_zero": trainer.is_global_zero}
    log_summary(summary)
    return summary


def load_module(ckpt: str | Path, overrides=(), device=None) -> DiffusionModule:
    """The module of a checkpoint, its stored config updated by ``key=value`` overrides (e.g. sampling settings)."""
    state = read_checkpoint(ckpt)
    cfg = apply_overrides(from_container(state["hyper_parameters"]["config"]), overrides)
    module = DiffusionModule(OmegaConf.to_container(cfg, resolve=True))
    try:
        module.load_state_dict(state["state_dict"])
    except RuntimeError:
        raise CheckpointError(f"the weights of {str(ckpt)!r} do not fit the model its config and the overrides "
                              f"{list(overrides)} describe; override sampling and evaluation settings (flow.*, "
                              "eval.*), not the model's") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return module.to(device).eval()


def sample_checkpoint(ckpt: str | Path, out: str | Path | None = None, overrides=()) -> Path:
    """A PNG grid of ``eval.grid_size`` EMA samples (seeds ``eval.sample_seed``; ``flow.*`` sampling settings)."""
    module = load_module(ckpt, overrides)
    e = module.cfg.eval
    images = module.sample(range(e.grid_size), batch_size=e.fid_batch_size, progress=True)
    out = Path(out) if out else Path(ckpt).parent.parent / "samples" / f"{Path(ckpt).stem}_grid.png"
    save_grid(images, out)
    return out


def fid_checkpoint(ckpt: str | Path, overrides=()) -> float:
    """FID of a checkpoint's EMA weights with its config's ``eval.*`` settings (override e.g. eval.fid_samples=10000)."""
    setup_logging(None)
    module = load_module(ckpt, overrides)
    if module.cfg.eval.fid_samples == 0:
        raise ConfigError("`eval.fid_samples`=0 turns FID off; give the number of samples to score, "
                          "e.g. eval.fid_samples=1000")
    _, dataset = prepare(module.cfg)
    extractor = fid.load_feature_extractor(module.cfg.eval.fid_features, module.device)
    log.info("FID features: %s", extractor.description)
    stats = Path(module.cfg.run.out_dir) / "fid_stats"
    return fid.score(module, dataset, extractor, stats, progress=True)[module.cfg.eval.fid_samples]
