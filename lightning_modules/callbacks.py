"""Callbacks that own every side effect of a run: throughput, FID, sample grids and checkpoint files.

Metrics go straight to the trainer's loggers at the current global step (rank 0), so they land at
the step they describe whatever ``log_every_n_steps`` is.
"""
import logging
import math
import resource
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torchvision.utils import make_grid, save_image

from lightning_modules import fid

log = logging.getLogger("llsa.run")


def log_metrics(trainer: L.Trainer, metrics: dict[str, float]) -> None:
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


def gatherer(pl_module):
    """``all_gather`` for numpy-backed tensors: moved to the module's device first (NCCL needs CUDA tensors)."""
    return lambda t: pl_module.all_gather(t.to(pl_module.device))


def save_grid(images: torch.Tensor, path: Path) -> torch.Tensor:
    """Images (B, C, H, W) in [0, 1] as a near-square grid PNG at ``path``; returns the grid."""
    grid = make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=1, pad_value=1.0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return grid


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated (GiB), or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class ThroughputMonitor(Callback):
    """``perf/tokens_per_s`` (pixel tokens: H*W per image), ``perf/images_per_s``, ``perf/step_ms`` and
    ``perf/peak_mem_gb``, averaged since the previous log, every ``log_every`` steps.

    A step is timed from batch start to batch end (forward, backward, optimizer, EMA; data loading and
    evaluation callbacks excluded), after a device sync. The first ``warmup_steps`` steps are left out.
    Counts are global: images per step are the per-rank batch times the world size.
    """

    def __init__(self, warmup_steps: int = 5, log_every: int = 10):
        self.warmup_steps, self.log_every = warmup_steps, log_every
        self.images = self.tokens = self.steps = 0
        self.seconds = self.peak_mem_gb = 0.0
        self._window = [0, 0, 0, 0.0]  # images, tokens, steps, seconds since the last log
        self._start = 0.0

    def _sync(self, device):
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(pl_module.device)
        seconds = time.perf_counter() - self._start
        if trainer.global_step <= self.warmup_steps:
            return
        x = batch[0]
        images = x.shape[0] * trainer.world_size
        tokens = images * x.shape[-2] * x.shape[-1]
        self.images, self.tokens, self.steps, self.seconds = (
            self.images + images, self.tokens + tokens, self.steps + 1, self.seconds + seconds)
        # read at the step's end, so the peak is training's and not that of a later evaluation
        self.peak_mem_gb = max(self.peak_mem_gb, peak_memory_gb(pl_module.device))
        w = self._window
        w[0], w[1], w[2], w[3] = w[0] + images, w[1] + tokens, w[2] + 1, w[3] + seconds
        if trainer.global_step % self.log_every == 0:
            log_metrics(trainer, self._rates(*w, self.peak_mem_gb))
            self._window = [0, 0, 0, 0.0]

    @staticmethod
    def _rates(images, tokens, steps, seconds, peak_mem_gb) -> dict[str, float]:
        return {"perf/tokens_per_s": tokens / seconds, "perf/images_per_s": images / seconds,
                "perf/step_ms": 1000 * seconds / steps, "perf/peak_mem_gb": peak_mem_gb}

    def summary(self) -> dict[str, float]:
        """Averages over every timed step of the run (empty if all steps were warm-up)."""
        if not self.steps:
            return {}
        return self._rates(self.images, self.tokens, self.steps, self.seconds, self.peak_mem_gb)


class EvaluationCallback(Callback):
    """Calls ``_run`` every ``every()`` steps (0: never during training) and once when training ends.
    ``_run`` records the step it ran at in ``_last_step`` and does nothing twice at one step."""

    def every(self) -> int:
        raise NotImplementedError

    def _run(self, trainer, pl_module):
        raise NotImplementedError

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        every = self.every()
        if every and trainer.global_step % every == 0:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._run(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module):
        # A run resumed from the checkpoint of its last step (killed during its final evaluation) skips the
        # training loop and with it on_train_end; evaluate here, on the device the teardown moved it from.
        if not 0 < trainer.max_steps <= trainer.global_step or self._last_step == trainer.global_step:
            return
        device = pl_module.device
        pl_module.to(trainer.strategy.root_device)
        try:
            self._run(trainer, pl_module)
        finally:
            pl_module.to(device)


class FIDCallback(EvaluationCallback):
    """``val/fid`` of ``fid_samples`` EMA samples against the training data, every ``fid_every`` steps
    (0: never during training) and once at the end.

    The feature extractor is loaded when fitting starts, so missing weights fail before training.
    Reference statistics are computed on first use and cached in ``stats_dir``. Under DDP every rank
    generates its share of samples and the features are gathered.
    """

    def __init__(self, cfg, stats_dir: Path, progress: bool = True):
        self.cfg, self.stats_dir, self.progress = cfg, Path(stats_dir), progress
        self.extractor: fid.FeatureExtractor | None = None
        self._last_step = -1
        self.history: list[tuple[int, float]] = []

    def on_fit_start(self, trainer, pl_module):
        if self.cfg.eval.fid_samples == 0:
            return
        self.extractor = fid.load_feature_extractor(self.cfg.eval.fid_features, pl_module.device)
        log.info("FID features: %s", self.extractor.description)

    def _run(self, trainer, pl_module):
        if self.cfg.eval.fid_samples == 0 or self._last_step == trainer.global_step:
            return
        self._last_step = trainer.global_step
        value = fid.score(pl_module, trainer.datamodule.dataset, self.extractor, self.stats_dir,
                          rank=trainer.global_rank, world=trainer.world_size, all_gather=gatherer(pl_module),
                          progress=self.progress and trainer.is_global_zero)
        self.history.append((trainer.global_step, value))
        log_metrics(trainer, {"val/fid": value})
        log.info("step %d: FID %.3f (%d samples)", trainer.global_step, value, self.cfg.eval.fid_samples)

    def every(self) -> int:
        return self.cfg.eval.fid_every


class SampleGridCallback(EvaluationCallback):
    """A grid of ``grid_size`` EMA samples from fixed seeds, every ``grid_every`` steps (0: only at the end):
    ``samples/ema`` in TensorBoard and ``samples/step_XXXXXXX.png`` in the run folder. Rank 0 only."""

    def __init__(self, cfg, out_dir: Path):
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self._last_step = -1
        self.last_path: Path | None = None

    def _run(self, trainer, pl_module):
        if not trainer.is_global_zero or self._last_step == trainer.global_step:
            return
        self._last_step = trainer.global_step
        e = self.cfg.eval
        images = pl_module.sample(range(e.grid_size), seed=e.sample_seed, batch_size=e.fid_batch_size)
        self.last_path = self.out_dir / f"step_{trainer.global_step:07d}.png"
        grid = save_grid(images, self.last_path)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image("samples/ema", grid, global_step=trainer.global_step)

    def every(self) -> int:
        return self.cfg.eval.grid_every


class StepCheckpoint(ModelCheckpoint):
    """``step_XXXXXXX.ckpt`` every ``every_n_train_steps`` and ``last.ckpt``, plus both at the end of training
    when the final step fell between two periodic saves (Lightning alone would leave ``last.ckpt`` behind).
    A file of the same name is overwritten: a run resumed in a moved folder writes ``last.ckpt``, not
    ``last-v1.ckpt`` beside the old one."""

    def __init__(self, dirpath: Path, every_n_train_steps: int):
        super().__init__(dirpath=dirpath, filename="step_{step:07d}", auto_insert_metric_name=False,
                         every_n_train_steps=every_n_train_steps, save_top_k=-1, save_last=True,
                         enable_version_counter=False)

    def on_train_end(self, trainer, pl_module):
        if self._last_global_step_saved != trainer.global_step and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
