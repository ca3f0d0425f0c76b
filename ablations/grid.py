"""The ablation runner behind ``run.py ablate``: expands grid files (``ablations.schema``), skips, resumes or
shares runs by their folders (``ablations.runs``), and trains the rest on the visible GPUs, ``--pack`` at a time
on each.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import queue
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from ablations.runs import (DONE, FAILED, STARTED, base_name, command_for, default_runner, move_aside,
                            read_marker, recorded_overrides, run_state, shared_runs)
from ablations.schema import (MISSING_VALUE, Grid, GridError, Run, format_value, is_input_name, load_grid,
                               parse_overrides, select)

LOG = "log.txt"


def _pixels(run: Run) -> int:
    """Pixels per image if the run's overrides set ``data.resolution`` (an int or [H, W]), else 0."""
    res = run.overrides.get("data.resolution")
    if isinstance(res, int):
        return res * res
    if isinstance(res, (list, tuple)) and len(res) == 2 and all(isinstance(r, int) for r in res):
        return res[0] * res[1]
    return 0


def visible_gpus() -> list[str]:
    """GPU ids a child may be pinned to: CUDA_VISIBLE_DEVICES if set, else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())]


def resolve_gpus(gpus: str) -> list[str | None]:
    """One entry per worker: the GPU id it pins its children to, or None (sequential, env untouched)."""
    if gpus == "auto":
        ids = visible_gpus()
        return list(ids) if ids else [None]
    try:
        n = int(gpus)
    except ValueError:
        raise GridError(f"--gpus must be a number or 'auto', got {gpus!r}") from None
    if n < 0:
        raise GridError(f"--gpus must be >= 0, got {n}")
    if n == 0:
        return [None]
    ids = visible_gpus()
    if len(ids) < n:
        raise GridError(f"--gpus {n} asks for more GPUs than are visible ({ids or 'none'}); "
                        "lower --gpus or set CUDA_VISIBLE_DEVICES")
    return ids[:n]


def _fmt_seconds(s: float) -> str:
    m, s = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def run_grid(grids: Grid | list[Grid], out: str | os.PathLike, *, gpus: str = "auto", pack: int = 1,
             runner: list[str] | None = None, dry_run: bool = False, start_until: float | None = None,
             echo=print) -> int:
    """Train every unfinished run of ``grids`` into ``out``, ``pack`` at once on each GPU; returns 1 if any run
    failed, else 0. ``start_until``: seconds after which no further run starts (those started finish), for a
    job with a time limit whose runs must end inside it; the summary names the runs left for the next call."""
    grids = [grids] if isinstance(grids, Grid) else list(grids)
    if runner is None:
        # imported here because ablations.checks builds on this module
        from ablations.checks import check_run_configs

        check_run_configs(grids, out)
    names = [run.name for grid in grids for run in grid.runs]
    if len(set(names)) != len(names):
        raise GridError("two grids of this call name the same run; give each grid its own `name:`")
    out = Path(out).resolve()
    runner = list(runner) if runner else default_runner()
    grid_of = {run.name: grid for grid in grids for run in grid.runs}
    all_runs = [run for grid in grids for run in grid.runs]
    shared = shared_runs(grids, out)
    states = {run.name: run_state(run, out) for run in all_runs if run.name not in shared}
    todo = [run for run in all_runs if run.name not in shared and states[run.name] != "done"]
    # largest images first (a stable sort, so grid order otherwise): the short runs then fill the GPUs
    # that finish early instead of one long run starting last
    todo.sort(key=lambda run: -_pixels(run))
    # a value left at ??? is named by the grid input it comes from, else by its config key
    missing = sorted({run.inputs.get(k, k) for run in todo for k, v in run.overrides.items() if v == MISSING_VALUE})

    if dry_run:
        for grid in grids:
            common = [a for a in command_for(grid, grid.runs[0], out, runner) if a.split("=", 1)[0] not in
                      {"run.name", *grid.runs[0].varied}]
            to_run = sum(run in todo for run in grid.runs)
            echo(f"{grid.name}: {len(grid.runs)} runs into {out} ({to_run} to run)")
            echo(f"  every run: {shlex.join(common)}")
            for run in grid.runs:
                own = [f"{k}={format_value(run.overrides[k])}" for k in run.varied] + [f"run.name={run.name}"]
                state = "shared" if run.name in shared else states[run.name]
                tail = f" (the same run as {shared[run.name]})" if run.name in shared else ""
                echo(f"  [{state:>7}] {run.name}: {shlex.join(own)}{tail}")
        if missing:
            echo(f"  note: set {', '.join(f'{k}=...' for k in missing)} on the command line before running")
        return 0
    if missing:
        raise GridError(f"grid {', '.join(repr(g.name) for g in grids)} needs {', '.join(missing)}: pass "
                        f"{' '.join(f'{k}=...' for k in missing)} after the grid file")

    if pack < 1:
        raise GridError(f"--pack must be >= 1 (runs at once per GPU), got {pack}")
    if start_until is not None and start_until < 0:
        raise GridError(f"--start-until must be >= 0 seconds, got {start_until}")
    workers = [gpu for gpu in resolve_gpus(gpus) for _ in range(pack)]
    total = len(all_runs)
    index = {run.name: i + 1 for i, run in enumerate(all_runs)}
    width = len(str(total))
    lock = threading.Lock()
    results: dict[str, tuple[int, float]] = {}
    live: dict[str, subprocess.Popen] = {}

    def say(run: Run, text: str) -> None:
        with lock:
            echo(f"[{index[run.name]:>{width}}/{total}] {run.name}: {text}", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    for run in all_runs:
        if run.name in shared:
            link = out / run.name
            if link.is_symlink() and os.readlink(link) != shared[run.name]:
                link.unlink()
            if not link.is_symlink():
                link.symlink_to(shared[run.name], target_is_directory=True)
            say(run, f"the same run as {shared[run.name]} (identical overrides): not trained again")
        elif states[run.name] == "done":
            say(run, "skip (finished)")

    jobs: queue.Queue[Run] = queue.Queue()
    for run in todo:
        jobs.put(run)

    def train(run: Run, gpu: str | None) -> None:
        run_dir = out / run.name
        state = states[run.name]
        if state == "stale":
            moved = move_aside(run_dir)
            say(run, f"stale folder (other overrides or not started by this runner) moved to {moved.name}")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / FAILED).unlink(missing_ok=True)
        grid = grid_of[run.name]
        cmd = command_for(grid, run, out, runner)
        resumed = state in ("failed", "partial")
        # the most runs that ever shared this run's GPU: its throughput and memory then measure a shared GPU
        shared_gpu = max(min(pack, len(todo)), ((read_marker(run_dir, STARTED) or {}) if resumed else {}).get("pack", 1))
        (run_dir / STARTED).write_text(json.dumps({"command": cmd, "overrides": recorded_overrides(run),
                                                   "base": base_name(grid), "pack": shared_gpu}, indent=1))
        env = dict(os.environ)
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        if len(workers) > 1 and "OMP_NUM_THREADS" not in env:
            # parallel runs share the host: unbounded BLAS threads (the FID's eigendecompositions) each
            # claiming every core slow all of them down
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // len(workers)))
        say(run, ("resume" if resumed else "start") + (f" on GPU {gpu}" if gpu is not None else ""))
        start = time.monotonic()
        # a resumed run keeps the log of its earlier attempts
        with open(run_dir / LOG, "a" if resumed else "w") as log:
            log.write(f"# {shlex.join(cmd)}\n# CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            with lock:
                live[run.name] = proc
            code = proc.wait()
            with lock:
                live.pop(run.name, None)
        seconds = time.monotonic() - start
        record = {"command": cmd, "overrides": recorded_overrides(run),
                  "exit_code": code, "seconds": round(seconds, 1), "gpu": gpu, "pack": shared_gpu}
        (run_dir / (DONE if code == 0 else FAILED)).write_text(json.dumps(record, indent=1))
        with lock:
            results[run.name] = (code, seconds)
        if code == 0:
            say(run, f"done in {_fmt_seconds(seconds)}")
        else:
            say(run, f"FAILED (exit {code}) after {_fmt_seconds(seconds)}; log: {run_dir / LOG}")

    stop = threading.Event()

    began = time.monotonic()

    def worker(gpu: str | None, finished: threading.Event) -> None:
        while not stop.is_set():
            if start_until is not None and time.monotonic() - began > start_until:
                break
            try:
                run = jobs.get_nowait()
            except queue.Empty:
                break
            try:
                train(run, gpu)
            except Exception as err:  # a broken run must not stop the others
                with lock:
                    results[run.name] = (-1, 0.0)
                say(run, f"FAILED to launch: {err}")
        finished.set()

    def wait_for_workers(timeout: float = math.inf) -> None:
        # sleep-polling, not Thread.join: a KeyboardInterrupt inside join can leave the thread looking dead
        deadline = time.monotonic() + timeout
        while not all(f.is_set() for f in finished) and time.monotonic() < deadline:
            time.sleep(0.2)

    finished = [threading.Event() for _ in workers[:max(1, len(todo))]]
    for gpu, flag in zip(workers, finished):
        threading.Thread(target=worker, args=(gpu, flag), daemon=True).start()
    try:
        wait_for_workers()
    except KeyboardInterrupt:
        # no new runs start; the running ones get SIGTERM and are marked FAILED, so the next call resumes them
        stop.set()
        with lock:
            procs = list(live.values())
        for proc in procs:
            proc.terminate()
        wait_for_workers(timeout=60)
        echo("interrupted: stopped the running trainings; finished runs are kept", flush=True)
        return 130

    failed = [name for name, (code, _) in results.items() if code != 0]
    skipped = total - len(todo)
    waiting = [run.name for run in todo if run.name not in results]
    names = " + ".join(grid.name for grid in grids)
    later = f", {len(waiting)} not started (--start-until {start_until:g} s had passed)" if waiting else ""
    echo(f"{names}: {total} runs, {skipped} skipped (finished or shared), {len(results) - len(failed)} done, "
         f"{len(failed)} failed{later}", flush=True)
    if waiting:
        echo(f"  not started, for the next call: {' '.join(waiting)}")
    for run in all_runs:
        if run.name in failed:
            echo(f"  failed: {run.name} (exit {results[run.name][0]}), log: {out / run.name / LOG}")
    return 1 if failed else 0


def main_ablate(argv: list[str]) -> int:
    """``run.py ablate GRID [GRID ...] [--dry-run] [--gpus N|auto] [--out DIR] [--runner CMD] [key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="run.py ablate",
        description="Train every run of one or more ablation grids (skipping finished and repeated runs).")
    parser.add_argument("args", nargs="+", metavar="GRID|key=value",
                        help="grid YAML files (e.g. configs/ablations/table1a_small.yaml), then dotted.key=value "
                             "overrides applied to every run (win last)")
    parser.add_argument("--out", default="runs", help="folder of the runs (default: runs)")
    parser.add_argument("--gpus", default="auto",
                        help="parallel runs, one GPU each; 'auto' = one per visible GPU; 0 = one at a time, "
                             "CUDA_VISIBLE_DEVICES untouched (default: auto)")
    parser.add_argument("--pack", type=int, default=1,
                        help="runs trained at once on each GPU (small runs leave a GPU partly idle; default: 1)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="train every row with seeds 0..N-1, each into its own folder (default: the grid's "
                             "`seeds`, else one run per row)")
    parser.add_argument("--only", nargs="+", default=None, metavar="PATTERN",
                        help="train only the runs whose names match one of these shell patterns, e.g. '*-full-s0'")
    parser.add_argument("--start-until", type=float, default=None, metavar="SECONDS",
                        help="start no run after this many seconds (running ones finish): for a job with a time "
                             "limit, so that every run it starts ends inside it; the rest wait for the next call")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their commands, train nothing")
    parser.add_argument("--runner", default=None,
                        help="command that trains one run, given [base.yaml] key=value ... "
                             "(default: python run.py fit)")
    try:
        args = parser.parse_intermixed_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        files = [a for a in args.args if "=" not in a]
        overrides = parse_overrides([a for a in args.args if "=" in a])
        if not files:
            raise GridError("name at least one grid file, e.g. configs/ablations/table1a_small.yaml")
        grids = [select(load_grid(f, overrides, seeds=args.seeds), args.only) for f in files]
        declared = sorted({name for grid in grids for name in grid.inputs})
        for key in overrides:
            if is_input_name(key) and key not in declared:
                raise GridError(f"{key}=... is neither a config key (those are dotted, section.key) nor an input of "
                                f"{' / '.join(g.name for g in grids)} (inputs: {', '.join(declared) or 'none'})")
        if args.only and not any(grid.runs for grid in grids):
            raise GridError(f"--only {' '.join(args.only)} matches no run; `--dry-run` lists the run names")
        grids = [grid for grid in grids if grid.runs]
        runner = shlex.split(args.runner) if args.runner else None
        return run_grid(grids, args.out, gpus=args.gpus, pack=args.pack, runner=runner, dry_run=args.dry_run,
                        start_until=args.start_until)
    except GridError as err:
        print(f"run.py ablate: error: {err}", file=sys.stderr)
        return 2
