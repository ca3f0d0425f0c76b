"""LLSA's selection, drawn: ``run.py picks CKPT`` and the ``picks/llsa`` TensorBoard image of a training run.

One image is generated with the EMA weights (seed ``eval.sample_seed``, sample 0); the q and k that one
attention layer sees at the last sampling step (the image nearly clean) give the picks drawn for a few
query pixels (``llsa.picks``).
"""
from pathlib import Path

import torch

from lightning_modules.callbacks import EvaluationCallback
from lightning_modules.config import ConfigError
from llsa.picks import capture_qk, default_queries, draw_picks, figure_array, query_key_sets

TAG = "picks/llsa"


def check_llsa(cfg, where: str) -> None:
    name = cfg.model.attention.name
    if name != "llsa":
        raise ConfigError(f"{where} uses model.attention.name={name}, not llsa: there are no LLSA picks to draw "
                          "(add model.attention.name=llsa to see what LLSA would pick in this model)")


def middle_layer(module) -> int:
    return len(module.ema.blocks) // 2


@torch.no_grad()
def picks_figure(module, layer: int | None = None, head: int = 0, pixels: list[tuple[int, int]] | None = None,
                 step: int | None = None):
    """The picks of attention layer ``layer`` (default: the middle one), head ``head``, for query ``pixels``
    (row, column; default: one in each quarter of the image) of one EMA sample of ``module`` (a DiffusionModule)."""
    dit = module.ema
    depth = len(dit.blocks)
    layer = middle_layer(module) if layer is None else layer
    if not 0 <= layer < depth:
        raise ConfigError(f"--layer {layer} does not exist; the model has layers 0..{depth - 1}")
    e, d = module.cfg.eval, module.cfg.data
    pixels = pixels or default_queries(d.resolution, d.resolution)
    with capture_qk(dit, layer) as seen:
        image = module.sample([0], seed=e.sample_seed, batch_size=1)[0]
    try:
        sets = query_key_sets(dit, layer, seen["q"], seen["k"], pixels, head)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    opts = dit.blocks[layer].attn.method.opts
    ks = sets[0]
    title = (f"LLSA picks, layer {layer} (layers 0..{depth - 1}), head {head}"
             + (f", step {step}" if step is not None else "")
             + f": {ks.n} tokens, blocks of {opts.block_size}, top-{opts.topk}, {ks.levels} level(s), "
               f"{ks.enrich_levels} enriched")
    return draw_picks(image, dit, sets, pixels, title)


def picks_checkpoint(ckpt: str | Path, out: str | Path | None = None, overrides=(), layer: int | None = None,
                     head: int = 0, pixels: list[tuple[int, int]] | None = None) -> Path:
    """A PNG of the picks of a checkpoint's EMA model (see :func:`picks_figure`); returns its path."""
    from lightning_modules.train import load_module

    module = load_module(ckpt, overrides)
    check_llsa(module.cfg, f"checkpoint {str(ckpt)!r}")
    fig = picks_figure(module, layer, head, pixels)
    out = Path(out) if out else Path(ckpt).parent.parent / "samples" / f"{Path(ckpt).stem}_picks.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


class PicksCallback(EvaluationCallback):
    """``picks/llsa`` in TensorBoard at every evaluation (the steps of ``eval.grid_every`` and
    ``eval.fid_every``, and the end of training) of a run with LLSA attention. Rank 0 only."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step < trainer.max_steps and any(every and step % every == 0
                                            for every in (self.cfg.eval.grid_every, self.cfg.eval.fid_every)):
            self.evaluate(trainer, pl_module)

    def _evaluate(self, trainer, pl_module, final: bool):
        if self.cfg.model.attention.name != "llsa" or not trainer.is_global_zero:
            return
        pixels = figure_array(picks_figure(pl_module, step=trainer.global_step))
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_image"):
                experiment.add_image(TAG, pixels, global_step=trainer.global_step, dataformats="HWC")
