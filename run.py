"""LLSA Lab command line.

    python run.py [fit] [CONFIG.yaml] [key=value ...]    train (the embedded default with no arguments)
    python run.py sample CKPT [--out PNG] [key=value ...]  a grid of EMA samples (eval.grid_size, flow.*)
    python run.py fid CKPT [key=value ...]               FID of a checkpoint (eval.fid_samples, ...)
    python run.py picks CKPT [--out PNG] [--layer I] [--head H] [--query ROW,COL ...] [key=value ...]
                                                         the key blocks LLSA picks for a few query pixels
    python run.py bench [...]                            attention kernel benchmark (benchmarks/bench.py)
    python run.py ablate GRID [...]                      run an ablation grid (ablations/grid.py)
    python run.py table GRID [...]                       tabulate an ablation grid (ablations/table.py)
    python run.py help                                   this text

Overrides use dotted keys of the config schema (lightning_modules/config.py), for example
``python run.py fit configs/experiments/fmnist64_dits.yaml model.attention.options.topk=16 train.max_steps=100``.
"""
import argparse
import importlib
import os
import sys

import torch

# Without a GPU, Triton kernels (backend=triton) can only run under the interpreter, which must be chosen
# before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

COMMANDS = ("fit", "sample", "fid", "picks", "bench", "ablate", "table", "help")
FORWARDED = {"bench": ("benchmarks.bench", "main"), "ablate": ("ablations.grid", "main_ablate"),
             "table": ("ablations.table", "main_table")}


class UsageError(ValueError):
    """A command line that names no command or option of run.py; the message says what is valid."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: ...``, exit code 2) like every other mistake."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG.yaml] key=value ...`` -> (config path or None, overrides)."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, args


def cmd_fit(args: list[str]) -> int:
    from lightning_modules.config import load_config
    from lightning_modules.runs import summary_lines
    from lightning_modules.train import fit

    if "-h" in args or "--help" in args:
        print(__doc__)
        return 0
    options = [a for a in args if a.startswith("-")]
    if options:
        raise UsageError(f"run.py fit takes [CONFIG.yaml] key=value ..., not {options[0]} (see run.py help)")
    path, overrides = split_config_args(args)
    summary = fit(load_config(path, overrides))
    if summary["is_global_zero"]:
        print("\n" + "\n".join(summary_lines(summary)))
    return 0


def cmd_sample(args: list[str]) -> int:
    from lightning_modules.train import sample_checkpoint

    parser = Parser(prog="run.py sample", description="PNG grid of EMA samples from a checkpoint")
    parser.add_argument("ckpt")
    parser.add_argument("--out", help="PNG path (default: next to the run's other sample grids)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. eval.grid_size=64 flow.sample_steps=50")
    ns = parser.parse_intermixed_args(args)
    print(f"Samples: {sample_checkpoint(ns.ckpt, ns.out, ns.overrides)}")
    return 0


def cmd_fid(args: list[str]) -> int:
    from lightning_modules.train import fid_checkpoint

    parser = Parser(prog="run.py fid", description="FID of a checkpoint's EMA weights")
    parser.add_argument("ckpt")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. eval.fid_samples=10000 data.path=/data/ffhq")
    ns = parser.parse_intermixed_args(args)
    print(f"FID: {fid_checkpoint(ns.ckpt, ns.overrides):.3f}")
    return 0


def pixel(text: str) -> tuple[int, int]:
    row, sep, col = text.partition(",")
    if not sep or not row.strip().isdigit() or not col.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not ROW,COL (pixels from the top left, e.g. 8,24)")
    return int(row), int(col)


def cmd_picks(args: list[str]) -> int:
    from lightning_modules.picks import picks_checkpoint

    parser = Parser(
        prog="run.py picks",
        description="Draw the key blocks LLSA picks at each level, and the enriched coarse tokens, for a few query "
                    "pixels of an image the checkpoint's EMA model generates (one PNG)")
    parser.add_argument("ckpt")
    parser.add_argument("--out", help="PNG path (default: next to the run's sample grids)")
    parser.add_argument("--layer", type=int, help="attention layer (block) to show (default: the middle one)")
    parser.add_argument("--head", type=int, default=0, help="attention head to show (default: 0)")
    parser.add_argument("--query", type=pixel, action="append", metavar="ROW,COL",
                        help="a query pixel; repeat for more (default: one in each quarter of the image)")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. eval.sample_seed=3 flow.sample_steps=50")
    ns = parser.parse_intermixed_args(args)
    print(f"Picks: {picks_checkpoint(ns.ckpt, ns.out, ns.overrides, ns.layer, ns.head, ns.query)}")
    return 0


def cmd_forward(command: str, args: list[str]) -> int:
    module_name, function = FORWARDED[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name not in (module_name, module_name.split(".")[0]):
            raise
        print(f"run.py {command}: {module_name.replace('.', '/')}.py is not available in this checkout", file=sys.stderr)
        return 2
    return getattr(module, function)(args) or 0


def main(argv: list[str] | None = None) -> int:
    from lightning_modules.config import ConfigError
    from lightning_modules.data import DataNotFoundError
    from lightning_modules.fid import FIDWeightsError
    from lightning_modules.runs import CheckpointError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    try:
        if argv and argv[0] in COMMANDS:
            command = argv.pop(0)
        elif argv and not is_fit_argument(argv[0]):
            raise UsageError(f"unknown command {argv[0]!r}; the commands are {', '.join(COMMANDS)} "
                             "(run.py fit, the default, takes [CONFIG.yaml] key=value ...; see run.py help)")
        else:
            command = "fit"
        if command in FORWARDED:
            return cmd_forward(command, argv)
        return {"fit": cmd_fit, "sample": cmd_sample, "fid": cmd_fid, "picks": cmd_picks}[command](argv)
    except (ConfigError, DataNotFoundError, FIDWeightsError, CheckpointError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def is_fit_argument(arg: str) -> bool:
    """Whether ``arg`` can start ``run.py fit``'s arguments: an option, an override or a config file."""
    return arg.startswith("-") or "=" in arg or arg.endswith((".yaml", ".yml")) or os.path.isfile(arg)


if __name__ == "__main__":
    sys.exit(main())
