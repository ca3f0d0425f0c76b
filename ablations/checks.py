"""Checks of an ablation call that fail in one line before anything runs or is written."""
from __future__ import annotations

import os
from pathlib import Path

from ablations.runs import command_for
from ablations.schema import MISSING_VALUE, Grid
from lightning_modules.config import ConfigError, load_config

# stands in for a `???` value (given on the command line before a real run) while the config is checked
PLACEHOLDER = "given-on-the-command-line"


def check_run_configs(grids: list[Grid], out: str | os.PathLike) -> None:
    """Load every run's config as ``run.py fit`` will (base file, then its overrides), so that a typo in a
    key or a bad value fails before the first run starts; raises ConfigError naming the run."""
    for grid in grids:
        for run in grid.runs:
            args = command_for(grid, run, Path(out), [])
            path = args.pop(0) if grid.base is not None else None
            overrides = [a if a.partition("=")[2] != MISSING_VALUE else f"{a.partition('=')[0]}={PLACEHOLDER}"
                         for a in args]
            try:
                load_config(path, overrides)
            except ConfigError as err:
                raise ConfigError(f"run {run.name} of grid {grid.name}: {err}") from None


def check_runs_found(grid: Grid, out: str | os.PathLike) -> None:
    """Raise ConfigError when no run of ``grid`` has a folder in ``out``: its table would be all "missing"."""
    out = Path(out)
    if any((out / run.name).exists() for run in grid.runs):
        return
    more = ", ..." if len(grid.runs) > 3 else ""
    raise ConfigError(f"no run of grid {grid.name} found in {str(out.resolve())!r} (looked for "
                      f"{', '.join(run.name for run in grid.runs[:3])}{more}); pass --out DIR, the folder that "
                      f"`run.py ablate --out DIR` trained them into, or train them with run.py ablate {grid.path}")
