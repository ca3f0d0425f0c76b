"""The LightningModule: flow-matching loss, AdamW, EMA weights, and a noise generator that resumes exactly.

Everything with a side effect (throughput, FID, sample grids, checkpoint files) lives in callbacks; this
module only trains. The resolved config is stored in the checkpoint, so ``load_from_checkpoint(path)``
rebuilds the model without the original YAML.
"""
import contextlib
import copy
import math

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from llsa.flow import FlowMatching
from llsa.models import build_dit, load_lowres_checkpoint
from lightning_modules.config import from_container
from lightning_modules.fid import generate, seed_of


def build_model(cfg: DictConfig):
    """The DiT a resolved config describes (``data.channels`` and ``model.num_classes`` filled in)."""
    m, d = cfg.model, cfg.data
    return build_dit(m.size, image_size=d.resolution, in_channels=d.channels, patch_size=m.patch_size,
                     rope_size=m.rope_size, num_classes=m.num_classes, class_dropout=m.class_dropout,
                     attention=m.attention.name, attention_options=OmegaConf.to_container(m.attention.options),
                     reorder=m.reorder)


def build_flow(cfg: DictConfig) -> FlowMatching:
    f = cfg.flow
    return FlowMatching(cfg.data.resolution, noise_rescale=f.noise_rescale, timestep_sampling=f.timestep_sampling,
                        shift=f.shift, logit_normal_mean=f.logit_normal_mean, logit_normal_std=f.logit_normal_std)


def ema_decay_at(step: int, max_decay: float, warmup: bool) -> float:
    """EMA decay after ``step`` optimizer steps: diffusers' warm-up ``1 - (1 + step)^(-3/4)`` (inv_gamma=1,
    power=3/4, the paper's setting) capped at ``max_decay``, or ``max_decay`` throughout without warm-up."""
    if not warmup:
        return max_decay
    return min(max_decay, 1 - (1 + step) ** -0.75)


def uses_gpu(cfg: DictConfig) -> bool:
    """Whether the run trains on a GPU: ``train.accelerator`` gpu/cuda, or auto with CUDA present."""
    acc = cfg.train.accelerator
    return acc in ("gpu", "cuda") or (acc == "auto" and torch.cuda.is_available())


def compile_mode(cfg: DictConfig) -> str | None:
    """``train.compile`` with ``auto`` resolved: ``default`` on a GPU for runs of >= 1,000 steps, else eager.

    Compiling a DiT-S takes about a minute; a run of a few hundred steps would spend more time compiling
    than compilation saves (docs/benchmarks.md has the step times).
    """
    t = cfg.train
    if t.compile != "auto":
        return t.compile
    return "default" if uses_gpu(cfg) and t.max_steps >= 1000 else None


def sampling_compile_mode(cfg: DictConfig) -> str | None:
    """``eval.compile`` with ``auto`` resolved to the training model's mode (:func:`compile_mode`)."""
    return compile_mode(cfg) if cfg.eval.compile == "auto" else cfg.eval.compile


def lr_factor(step: int, warmup: int, total: int, schedule: str, final_ratio: float) -> float:
    """The learning rate at optimizer step ``step`` as a fraction of ``train.lr``: linear warm-up over
    ``warmup`` steps, then constant or a cosine / linear decay reaching ``final_ratio`` at step ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
    return final_ratio + (1 - final_ratio) * shape


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """``train.precision``, with ``"auto"`` meaning bf16-mixed on a GPU and 32-true on the CPU."""
    if precision == "auto":
        return "bf16-mixed" if on_gpu else "32-true"
    return precision


class DiffusionModule(L.LightningModule):
    """Trains ``model`` with the flow-matching loss; ``ema`` is the weight average used for every evaluation."""

    def __init__(self, config: dict):
        super().__init__()
        # a plain dict, so the checkpoint's hyper-parameters need no omegaconf classes to load
        self.save_hyperparameters({"config": config}, logger=False)
        self.cfg = from_container(config)
        self.model = build_model(self.cfg)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        mode = compile_mode(self.cfg)
        if mode:
            # in place: parameter names, and so checkpoints and the EMA update, stay those of the eager model
            self.model.compile(mode=mode, backend=self.cfg.train.compile_backend)
        self.flow = build_flow(self.cfg)
        self._sampling_model = None
        self.generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None

    def init_from(self, path: str) -> None:
        """Start from the EMA weights of a (lower-resolution) run's checkpoint, for both model and EMA."""
        state = torch.load(path, map_location="cpu", weights_only=False)
        load_lowres_checkpoint(self.model, state, prefix="ema.")
        self.ema.load_state_dict(self.model.state_dict())

    @property
    def conditional(self) -> bool:
        return self.cfg.model.num_classes > 0

    def on_fit_start(self):
        # One noise stream per rank, on the training device; restored from the checkpoint when resuming.
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed_of(self.cfg.run.seed, self.global_rank))
        if self._generator_state is not None:
            self.generator.set_state(self._generator_state)
            self._generator_state = None

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.flow.loss(self.model, x, self.generator, y=y if self.conditional else None)
        # logged every train.log_every steps, the progress bar refreshed as often: reading the loss waits for
        # the GPU, so doing it every step would keep the host from queueing the next step ahead
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def optimizer_step(self, *args, **kwargs):
        # Update the EMA right after each optimizer step, before any callback (checkpoint, FID) sees the step.
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    @torch.no_grad()
    def update_ema(self):
        t = self.cfg.train
        # global_step still counts the previous steps here: 0 at the first update, which copies the weights
        decay = ema_decay_at(self.global_step, t.ema_decay, t.ema_warmup)
        ema_params = list(self.ema.parameters())
        params = [p.detach() for p in self.model.parameters()]
        # ema <- decay * ema + (1 - decay) * param
        torch._foreach_lerp_(ema_params, params, 1 - decay)
        for b_ema, b in zip(self.ema.buffers(), self.model.buffers()):
            b_ema.copy_(b)

    def configure_optimizers(self):
        t = self.cfg.train
        opt = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=t.eps,
                                weight_decay=t.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, t.warmup_steps, t.max_steps, t.lr_schedule, t.lr_final_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        if self.generator is not None:
            checkpoint["noise_generator"] = self.generator.get_state()

    def on_load_checkpoint(self, checkpoint):
        self._generator_state = checkpoint.get("noise_generator")

    def train(self, mode: bool = True):
        # The EMA copy only ever evaluates, whatever mode the trainer puts the module in.
        super().train(mode)
        self.ema.eval()
        return self

    def sampling_model(self):
        """The EMA model as FID sampling calls it: compiled per ``eval.compile``, else the EMA itself.

        The compiled wrapper shares the EMA's parameters, so it samples from the current weights. It is
        kept outside the module's children (it would add a second copy of the EMA to checkpoints), and
        compiled for fixed shapes: one graph per sampling batch size instead of a slower dynamic one.
        """
        mode = sampling_compile_mode(self.cfg)
        if not mode:
            return self.ema
        if self._sampling_model is None:
            object.__setattr__(self, "_sampling_model", torch.compile(
                self.ema, mode=mode, backend=self.cfg.train.compile_backend, dynamic=False))
        return self._sampling_model

    def eval_autocast(self):
        """The autocast that training used, for sampling outside the trainer's forward context."""
        precision = resolve_precision(self.cfg.train.precision, self.device.type == "cuda")
        if self.device.type == "cuda" and precision in ("bf16-mixed", "16-mixed"):
            return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16-mixed" else torch.float16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def sample(self, indices, seed: int | None = None, batch_size: int = 64, progress: bool = False):
        """EMA samples in [0, 1], one image per index, noise seeded per index (see ``fid.sample_noise``), with
        the config's ``flow`` sampling settings; ``seed`` defaults to ``eval.sample_seed``."""
        f, d = self.cfg.flow, self.cfg.data
        shape = (d.channels, d.resolution, d.resolution)
        batches = generate(self.ema, self.flow, indices, shape, self.cfg.eval.sample_seed if seed is None else seed,
                           batch_size=batch_size, steps=f.sample_steps, sampler=f.sampler,
                           num_classes=self.cfg.model.num_classes, cfg_scale=f.cfg_scale, device=self.device,
                           progress=progress)
        with self.eval_autocast():
            return torch.cat([images.float() for images in batches])
