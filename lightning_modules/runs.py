"""Run folders and checkpoints checked before anything is written, and what a run's ``log.txt`` records.

A run folder holds one training: a fresh start under the name of an existing run is refused, and a
resume is checked against the config stored in its checkpoint, so two runs never mix in one folder and
a failed resume leaves the folder as it was.
"""
import dataclasses
import logging
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lightning_modules.config import ConfigError, from_container, run_dir
from lightning_modules.fid import FIDWeightsError
from llsa.attention import options_for

log = logging.getLogger("llsa.run")

# Keys a resumed run may change: where the run lives, when training stops, evaluation, logging, the hardware
# it runs on, how the same model is executed, and sampling settings that only evaluations use.
RESUMABLE = ("run.name", "run.out_dir", "train.max_steps", "train.ckpt_path", "train.init_from", "train.log_every",
             "train.ckpt_every", "train.warmup_perf_steps", "train.devices", "train.num_nodes", "train.strategy",
             "train.accelerator", "train.compile", "train.compile_backend", "data.num_workers", "data.path",
             "data.resident", "data.resident_max_gb", "flow.sample_steps", "flow.sampler", "flow.cfg_scale",
             "model.attention.options.backend", "model.attention.options.deterministic", "eval.")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or not written by ``run.py fit``; the message says which."""


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict:
    """The checkpoint at ``path`` (on the CPU), with its stored run config under ``hyper_parameters.config``.
    ``mmap`` maps the tensors instead of reading them, for a look at the config alone."""
    path = Path(path)
    hint = "pass a .ckpt written by `run.py fit`, e.g. runs/NAME/checkpoints/last.ckpt"
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"checkpoint {str(path)!r} {what}; {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as err:  # truncated zip, pickle garbage, not a torch file at all: all say the same
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read checkpoint {str(path)!r} (truncated or not a checkpoint: {reason}); "
                              f"{hint}") from None
    stored = state.get("hyper_parameters", {}).get("config") if isinstance(state, dict) else None
    if not isinstance(stored, dict) or "state_dict" not in state:
        raise CheckpointError(f"{str(path)!r} holds no run config and weights, so it was not written by "
                              f"`run.py fit`; {hint}")
    return state


def _flat(cfg: DictConfig) -> dict:
    """Dotted key -> value of a config, attention options spelt out in full (a default given or left out
    is the same setting)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    attention = data["model"]["attention"]
    try:
        attention["options"] = dataclasses.asdict(options_for(attention["name"], **attention["options"]))
    except (KeyError, TypeError, ValueError):
        # options this code no longer accepts (an old checkpoint's) are compared as they were written
        pass
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = node

    walk(data, "")
    return out


def config_differences(stored: DictConfig, cfg: DictConfig) -> list[str]:
    """``key (stored -> now)`` for every key outside :data:`RESUMABLE` whose value differs."""
    old, new = _flat(stored), _flat(cfg)
    diffs = []
    for key in sorted(old.keys() | new.keys()):
        if any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE):
            continue
        if old.get(key) != new.get(key):
            diffs.append(f"{key} ({old.get(key)} -> {new.get(key)})")
    return diffs


def check_start(cfg: DictConfig) -> None:
    """Check, before anything is written, that ``cfg`` (resolved by ``prepare``) may start or resume its run.
    Raises ConfigError or CheckpointError.

    - no ``train.ckpt_path``: the run folder must not hold an earlier run;
    - ``train.ckpt_path=last``: resumes ``last.ckpt`` if the folder has one, else starts in the folder;
    - a path: that checkpoint must be readable;
    and a checkpoint resumed must have been written with the same config, up to :data:`RESUMABLE` keys. A
    fresh start's ``train.init_from`` must be readable.
    """
    rd = run_dir(cfg)
    path = cfg.train.ckpt_path
    if path is None:
        # Rank 0 alone: the other ranks (torchrun's, or re-run by Lightning's launcher) may find the folder
        # that rank 0 has just written.
        if rank_zero_only.rank == 0 and rd.is_dir() and any(rd.iterdir()):
            held = ", ".join(sorted(p.name for p in rd.iterdir())[:4])
            raise ConfigError(f"run folder {str(rd)!r} already holds a run ({held}); resume it with "
                              "train.ckpt_path=last, or start a new run with another run.name=...")
    if path == "last" and (rd / "checkpoints" / "last.ckpt").is_file():
        path = str(rd / "checkpoints" / "last.ckpt")
    if path in (None, "last"):
        if cfg.train.init_from:
            read_checkpoint(cfg.train.init_from, mmap=True)
        return
    stored = from_container(read_checkpoint(path, mmap=True)["hyper_parameters"]["config"])
    diffs = config_differences(stored, cfg)
    if diffs:
        raise ConfigError(f"cannot resume {path}: its run was trained with other settings, which cannot change "
                          f"on resume: {'; '.join(diffs)}. Drop those overrides, or start a new run with "
                          "another run.name=... (train.init_from=CKPT starts it from the checkpoint's weights)")


def to_log_file(message: str, level: int = logging.INFO, exc_info=None) -> None:
    """``message`` into the run's ``log.txt`` only (the file handlers ``setup_logging`` added), not the terminal."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, exc_info)
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def summary_lines(summary: dict) -> list[str]:
    """The end of a run, as `run.py fit` prints it and ``log.txt`` keeps it: folder, final FID, throughput,
    sample grid and checkpoint."""
    lines = [f"Run folder: {summary['run_dir']} (config.yaml, log.txt, tb/, samples/, checkpoints/)"]
    if summary["fid"] is not None:
        lines.append(f"Final FID at step {summary['global_step']}: {summary['fid']:.2f}")
    perf = summary["throughput"]
    if perf:
        lines.append(f"Throughput: {perf['perf/tokens_per_s']:,.0f} pixel tokens/s, {perf['perf/images_per_s']:.1f} "
                     f"images/s, {perf['perf/step_ms']:.0f} ms/step, peak memory {perf['perf/peak_mem_gb']:.2f} GiB")
    if summary["grid"]:
        lines.append(f"Samples: {summary['grid']}")
    lines.append(f"Checkpoint: {summary['last_ckpt']}  (resume with train.ckpt_path=last)")
    return lines


def log_summary(summary: dict) -> None:
    """The end of a run in ``log.txt`` (:func:`summary_lines`), after the step it finished at."""
    to_log_file(f"finished at step {summary['global_step']}")
    for line in summary_lines(summary):
        to_log_file(line)


def log_error(err: BaseException) -> None:
    """A run's error in ``log.txt``: the one line the user sees, and the traceback for unexpected ones."""
    if isinstance(err, (KeyboardInterrupt, SystemExit)):
        to_log_file("interrupted", logging.ERROR)
        return
    expected = isinstance(err, (ConfigError, CheckpointError, FileNotFoundError, FIDWeightsError))
    to_log_file(f"error: {err}" if str(err) else f"error: {type(err).__name__}", logging.ERROR,
                None if expected else (type(err), err, err.__traceback__))


class LossLog(Callback):
    """``train/loss`` into ``log.txt`` every ``every`` steps (rank 0; the terminal has the progress bar)."""

    def __init__(self, every: int):
        self.every = every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not trainer.is_global_zero or step % self.every:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            to_log_file(f"step {step}: train/loss {float(loss):.4f}")
