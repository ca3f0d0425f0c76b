"""Run folders of a grid: markers, identity, and what the runner does with a folder it finds.

A run is *finished* when ``{out}/{run}/DONE`` exists: the runner writes it (JSON: command, overrides,
seconds) only after the trainer exited with code 0; finished runs are skipped. At launch it writes
``STARTED`` (JSON with the overrides); a non-zero exit writes ``FAILED`` (with the exit code). A failed
or interrupted run with the same overrides is launched again in its folder with ``train.ckpt_path=last``
(always passed unless given), so the trainer resumes from its last checkpoint and the table merges the
events of both attempts by step. A run whose recorded overrides differ from the current ones, or a folder
the runner did not start, is *stale*: it is renamed ``{run}.prev-<k>`` and trained from scratch, so that
its TensorBoard events never mix into the table.

Several grids can run in one call (``run.py ablate A.yaml B.yaml``), sharing the GPUs. A run whose base
and overrides equal those of an earlier run of the call, or of a finished run already in ``{out}``, is
not trained twice: ``{out}/{run}`` becomes a symbolic link to that run's folder (Table 2's full-attention
row at 64x64 is Table 1a's, for instance), and both tables read the same events.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ablations.schema import Grid, Run, format_value

REPO = Path(__file__).resolve().parents[1]
DONE = "DONE"
FAILED = "FAILED"
STARTED = "STARTED"
# lets a retried run resume from {out_dir}/{name}/checkpoints/last.ckpt (the trainer ignores it when absent)
RESUME_KEY, RESUME_VALUE = "train.ckpt_path", "last"


def command_for(grid: Grid, run: Run, out: Path, runner: list[str]) -> list[str]:
    """The subprocess argv that trains ``run`` into ``out / run.name``."""
    args = list(runner)
    if grid.base is not None:
        args.append(str(grid.base))
    args += [f"{k}={format_value(v)}" for k, v in run.overrides.items()]
    if RESUME_KEY not in run.overrides:
        args.append(f"{RESUME_KEY}={RESUME_VALUE}")
    return args + [f"run.name={run.name}", f"run.out_dir={out}"]


def default_runner() -> list[str]:
    return [sys.executable, str(REPO / "run.py"), "fit"]


def read_marker(run_dir: Path, marker: str) -> dict | None:
    path = run_dir / marker
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text() or "{}")
    except json.JSONDecodeError:
        return {}


def recorded_overrides(run: Run) -> dict[str, str]:
    return {k: format_value(v) for k, v in run.overrides.items()}


def base_name(grid: Grid) -> str | None:
    """The grid's base config as recorded in a run's STARTED marker: relative to the repository when inside
    it, so that runs finished in another checkout of the project are recognised."""
    if grid.base is None:
        return None
    try:
        return str(grid.base.relative_to(REPO))
    except ValueError:
        return str(grid.base)


def _identity(base: str | None, overrides: dict[str, str]) -> str:
    """What makes two runs the same training: the base config and every recorded override (not the run's
    name), for a run about to start and for one found finished in the folder alike."""
    return json.dumps([base, overrides], sort_keys=True)


def _finished_runs(out: Path) -> dict[str, str]:
    """Identity -> folder name of every finished run in ``out`` that is a real folder, not a link."""
    found: dict[str, str] = {}
    if not out.is_dir():
        return found
    for run_dir in sorted(out.iterdir()):
        done = read_marker(run_dir, DONE) if run_dir.is_dir() and not run_dir.is_symlink() else None
        if done and "overrides" in done:
            base = (read_marker(run_dir, STARTED) or {}).get("base")
            found.setdefault(_identity(base, done["overrides"]), run_dir.name)
    return found


def shared_runs(grids: list[Grid], out: Path) -> dict[str, str]:
    """Run name -> the name of the run it repeats (earlier in ``grids``, or finished in ``out``).

    Only a run without a folder of its own (or already such a link) is shared.
    """
    owner = _finished_runs(out)
    shared: dict[str, str] = {}
    for grid in grids:
        for run in grid.runs:
            key = _identity(base_name(grid), recorded_overrides(run))
            first = owner.setdefault(key, run.name)
            own = out / run.name
            if first != run.name and (own.is_symlink() or not own.exists()):
                shared[run.name] = first
    return shared


def run_state(run: Run, out: Path) -> str:
    """``done`` (skip), ``failed`` / ``partial`` (resume in place), ``stale`` (move aside, restart) or ``new``."""
    run_dir = out / run.name
    want = recorded_overrides(run)
    done = read_marker(run_dir, DONE)
    if done is not None:
        return "done" if done.get("overrides") == want else "stale"
    started = read_marker(run_dir, STARTED)
    if started is None:
        return "stale" if run_dir.exists() else "new"
    if started.get("overrides") != want:
        return "stale"
    return "failed" if (run_dir / FAILED).exists() else "partial"


def move_aside(run_dir: Path) -> Path:
    k = 1
    while run_dir.with_name(f"{run_dir.name}.prev-{k}").exists():
        k += 1
    target = run_dir.with_name(f"{run_dir.name}.prev-{k}")
    run_dir.rename(target)
    return target
