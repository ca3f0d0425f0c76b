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


# grid cells are drawn at least this many pixels wide, so a grid of 16x16 samples is not a thumbnail
MIN_CELL = 64


def save_grid(images: torch.Tensor, path: Path) -> torch.Tensor:
    """Images (B, C, H, W) in [0, 1] as a near-square grid PNG at ``path``; returns the grid. Images smaller
    than ``MIN_CELL`` are enlarged by a whole factor, each pixel a square (nearest neighbour), not smoothed."""
    factor = max(1, -(-MIN_CELL // images.shape[-1]))
    if factor > 1:
        images = images.repeat_interleave(factor, -2).repeat_interleave(factor, -1)
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


class EvaluationCallback(Callback):
    """Evaluates every ``every()`` steps (0: never during training) and once more, ``final``, when training
    ends. Subclasses implement ``_evaluate(trainer, pl_module, final)``; an evaluation never runs twice at
    one step. ``seconds`` adds up the time spent evaluating, which throughput leaves out."""

    def __init__(self):
        self._last_step = -1
        self.seconds = 0.0

    def every(self) -> int:
        raise NotImplementedError

    def _evaluate(self, trainer, pl_module, final: bool):
        raise NotImplementedError

    def evaluate(self, trainer, pl_module, final: bool = False):
        if self._last_step == trainer.global_step:
            return
        self._last_step = trainer.global_step
        # the training steps still queued on the GPU belong to training, not to this evaluation
        _sync(pl_module.device)
        start = time.perf_counter()
        self._evaluate(trainer, pl_module, final)
        _sync(pl_module.device)
        self.seconds += time.perf_counter() - start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        every = self.every()
        if every and trainer.global_step % every == 0 and trainer.global_step < trainer.max_steps:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.evaluate(trainer, pl_module, final=True)

    def on_fit_end(self, trainer, pl_module):
        # A run resumed from the checkpoint of its last step (killed during its final evaluation) skips the
        # training loop and with it on_train_end; evaluate here, on the device the teardown moved it from.
        if not 0 < trainer.max_steps <= trainer.global_step or self._last_step == trainer.global_step:
            return
        device = pl_module.device
        pl_module.to(trainer.strategy.root_device)
        try:
            self.evaluate(trainer, pl_module, final=True)
        finally:
            pl_module.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ThroughputMonitor(Callback):
    """``perf/tokens_per_s`` (pixel tokens: H*W per image), ``perf/images_per_s``, ``perf/step_ms`` and
    ``perf/peak_mem_gb`` every ``log_every`` steps, over the steps since the previous log.

    Wall time of whole windows of steps (forward, backward, optimizer, EMA, batch drawing, logging,
    checkpoints: everything a run spends per step), less the time evaluation callbacks spent inside the
    window. The GPU is synchronised only where a window closes, every ``log_every`` steps, so the host keeps
    queueing steps ahead of the GPU in between. The first ``warmup_steps`` steps (compilation, autotuning)
    are left out. Counts are global: images per step are the per-rank batch times the world size.
    """

    def __init__(self, warmup_steps: int = 5, log_every: int = 10):
        self.warmup_steps, self.log_every = warmup_steps, log_every
        self.images = self.tokens = self.steps = 0
        self.seconds = self.peak_mem_gb = 0.0
        # open window: [images, tokens, steps, start time, evaluation seconds at the start]; None when closed
        self._window: list | None = None

    @staticmethod
    def _evaluation_seconds(trainer) -> float:
        return sum(cb.seconds for cb in trainer.callbacks if isinstance(cb, EvaluationCallback))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # global_step counts finished steps: this batch is step global_step + 1
        if self._window is None and trainer.global_step >= self.warmup_steps:
            _sync(pl_module.device)
            self._window = [0, 0, 0, time.perf_counter(), self._evaluation_seconds(trainer)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        w = self._window
        if w is None:
            return
        x = batch[0]
        images = x.shape[0] * trainer.world_size
        w[0], w[1], w[2] = w[0] + images, w[1] + images * x.shape[-2] * x.shape[-1], w[2] + 1
        if trainer.global_step % self.log_every == 0:
            self._close(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self._window is not None and self._window[2]:
            self._close(trainer, pl_module)

    def _close(self, trainer, pl_module):
        _sync(pl_module.device)
        images, tokens, steps, start, evaluation = self._window
        seconds = time.perf_counter() - start - (self._evaluation_seconds(trainer) - evaluation)
        self._window = None
        self.images, self.tokens, self.steps, self.seconds = (
            self.images + images, self.tokens + tokens, self.steps + steps, self.seconds + seconds)
        self.peak_mem_gb = max(self.peak_mem_gb, peak_memory_gb(pl_module.device))
        log_metrics(trainer, self._rates(images, tokens, steps, seconds, self.peak_mem_gb))

    @staticmethod
    def _rates(images, tokens, steps, seconds, peak_mem_gb) -> dict[str, float]:
        return {"perf/tokens_per_s": tokens / seconds, "perf/images_per_s": images / seconds,
                "perf/step_ms": 1000 * seconds / steps, "perf/peak_mem_gb": peak_mem_gb}

    def summary(self) -> dict[str, float]:
        """Averages over every timed step of the run (empty if all steps were warm-up)."""
        if not self.steps:
            return {}
        return self._rates(self.images, self.tokens, self.steps, self.seconds, self.peak_mem_gb)


class FIDCallback(EvaluationCallback):
    """FID of EMA samples against the training data.

    Every ``fid_every`` steps (0: never during training) ``val/fid_curve`` on ``fid_curve_samples`` samples;
    when training ends ``val/fid`` on ``fid_samples`` samples and, when there is a curve, its last point from
    the first ``fid_curve_samples`` of those samples (sample ``i`` has the same noise at every step).

    The feature extractor is loaded when fitting starts, so missing weights fail before training.
    Reference statistics are computed on first use and cached in ``stats_dir``. Under DDP every rank
    generates its share of samples and the features are gathered.
    """

    def __init__(self, cfg, stats_dir: Path, progress: bool = True):
        super().__init__()
        self.cfg, self.stats_dir, self.progress = cfg, Path(stats_dir), progress
        self.extractor: fid.FeatureExtractor | None = None
        # (step, tag, samples, FID)
        self.history: list[tuple[int, str, int, float]] = []

    def on_fit_start(self, trainer, pl_module):
        if self.cfg.eval.fid_samples == 0:
            return
        self.extractor = fid.load_feature_extractor(self.cfg.eval.fid_features, pl_module.device)
        log.info("FID features: %s", self.extractor.description)

    def _evaluate(self, trainer, pl_module, final: bool):
        e = self.cfg.eval
        if e.fid_samples == 0:
            return
        curve = e.fid_curve_samples or e.fid_samples
        counts = {}
        if final:
            counts["val/fid"] = e.fid_samples
        if not final or e.fid_every:
            counts["val/fid_curve"] = curve
        start = time.perf_counter()
        values = fid.score(pl_module, trainer.datamodule.dataset, self.extractor, self.stats_dir,
                           counts=sorted(set(counts.values())), rank=trainer.global_rank,
                           world=trainer.world_size, all_gather=gatherer(pl_module),
                           progress=self.progress and trainer.is_global_zero)
        seconds = time.perf_counter() - start
        for tag, n in counts.items():
            self.history.append((trainer.global_step, tag, n, values[n]))
            log.info("step %d: %s %.3f (%d samples; evaluation took %.0f s)", trainer.global_step, tag, values[n], n,
                     seconds)
        log_metrics(trainer, {tag: values[n] for tag, n in counts.items()})

    def final(self) -> float | None:
        """The final FID (``val/fid``), once training has ended."""
        return next((value for _, tag, _, value in reversed(self.history) if tag == "val/fid"), None)

    def every(self) -> int:
        return self.cfg.eval.fid_every


class SampleGridCallback(EvaluationCallback):
    """A grid of ``grid_size`` EMA samples from fixed seeds, every ``grid_every`` steps (0: only at the end):
    ``samples/ema`` in TensorBoard and ``samples/step_XXXXXXX.png`` in the run folder. Rank 0 only."""

    def __init__(self, cfg, out_dir: Path):
        super().__init__()
        self.cfg, self.out_dir = cfg, Path(out_dir)
        self.last_path: Path | None = None

    def _evaluate(self, trainer, pl_module, final: bool):
        if not trainer.is_global_zero:
            return
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


# what a grid varies, logged with every run so that TensorBoard's HParams view lines up a whole grid
HPARAM_KEYS = ("model.attention.name", "model.attention.options.block_size", "model.attention.options.topk",
               "model.attention.options.levels", "model.attention.options.enrich_levels",
               "model.attention.options.reweight", "model.reorder", "flow.noise_rescale", "flow.timestep_sampling",
               "flow.shift", "data.resolution", "model.size", "run.seed")


def hparams_of(cfg) -> dict[str, str | int | float | bool]:
    """``HPARAM_KEYS``' values in ``cfg``; an unset option (the method's default) reads ``default``."""
    from omegaconf import OmegaConf

    values = {}
    for key in HPARAM_KEYS:
        value = OmegaConf.select(cfg, key, default=None)
        values[key] = "default" if value is None else value
    return values


class HParamsCallback(Callback):
    """After the final evaluation, the run's ``HPARAM_KEYS`` as TensorBoard hparams with its final FID,
    throughput and peak memory as their metrics (``hparams/fid``, ``hparams/tokens_per_s``,
    ``hparams/peak_mem_gb``). Must come after the FID callback and the throughput monitor."""

    def __init__(self, cfg, throughput: ThroughputMonitor, fid_cb: FIDCallback):
        self.cfg, self.throughput, self.fid_cb = cfg, throughput, fid_cb
        self._written = False

    def _write(self, trainer):
        if self._written or not trainer.is_global_zero:
            return
        self._written = True
        perf = self.throughput.summary()
        metrics = {"hparams/fid": self.fid_cb.final(), "hparams/tokens_per_s": perf.get("perf/tokens_per_s"),
                   "hparams/peak_mem_gb": perf.get("perf/peak_mem_gb")}
        metrics = {k: float(v) for k, v in metrics.items() if v is not None}
        for logger in trainer.loggers:
            logger.log_hyperparams(hparams_of(self.cfg), metrics)

    def on_train_end(self, trainer, pl_module):
        self._write(trainer)

    def on_fit_end(self, trainer, pl_module):
        if 0 < trainer.max_steps <= trainer.global_step:
            self._write(trainer)


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
