"""Ablation grids: a YAML file that expands into named training runs, and the runner that trains them.

Grid file format (see also ``configs/ablations/README.md``)::

    name: table1a_small          # optional; defaults to the file name without ".yaml"
    description: free text       # optional; printed above the table
    base: ../base.yaml           # optional run config, relative to this file; passed first to `run.py fit`
    overrides:                   # dotted key -> value, applied to every run
      data.name: fashion_mnist
      train.max_steps: 500
    seeds: 3                     # optional: every row once per seed (0, 1, 2; or a list), each its own run
    rows:                        # EITHER explicit rows, in the order the table shows them ...
      - label: Full attention    # row label in the table; the run name is built from it
        name: full               # optional run-name part (default: the label, made filesystem-safe)
        set: {model.attention.name: full}
        paper: {fid: 24.91, throughput: 188.88}   # optional reference numbers, by table column key
    axes:                        # ... OR axes: dotted key -> list of values, expanded as a Cartesian product
      model.attention.options.topk: [8, 16]
    table:                       # optional; what `run.py table` shows
      label: attention           # header of the row-label column
      columns:                   # "TAG (REDUCE)" strings or mappings (keys below)
        - {key: fid, tag: val/fid, reduce: last, header: "FID"}
        - {key: throughput, tag: perf/tokens_per_s, reduce: median, scale: 1.0e-3, header: "10^3 tok/s"}
        - {key: topk, config: model.attention.options.topk}   # a value from the run's config.yaml
      plot: {x: throughput, y: fid}
      curve: val/fid_curve       # optional: a scalar drawn over training steps, one line per row

Values are YAML (loaded with OmegaConf, so ``1e-4`` is a float and ``${train.max_steps}`` stays an
interpolation for the trainer to resolve). ``???`` marks a value the user must give on the command
line (``data.path=...``); the runner refuses to start while one is left.

Precedence, lowest first: ``base`` < ``overrides`` < the row's ``set`` (or the axis values) < extra
``key=value`` arguments of ``run.py ablate``. The runner appends ``run.name`` and ``run.out_dir``.

Run names are ``<grid name>-<row part>``; for axes the row part joins ``<leaf><value>`` per axis
(``topk8-levels2``; strings and booleans as ``<leaf>-<value>``, e.g. ``reorder-on``). With ``seeds`` (or
``run.py ablate --seeds N``) each row runs once per seed, as ``<grid name>-<row part>-s<seed>`` with
``run.seed=<seed>``, and the table reports each row's mean, standard deviation and count over its seeds.

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

import argparse
import dataclasses
import fnmatch
import itertools
import json
import math
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
DONE = "DONE"
FAILED = "FAILED"
STARTED = "STARTED"
# lets a retried run resume from {out_dir}/{name}/checkpoints/last.ckpt (the trainer ignores it when absent)
RESUME_KEY, RESUME_VALUE = "train.ckpt_path", "last"
LOG = "log.txt"
MISSING_VALUE = "???"
GRID_KEYS = {"name", "description", "base", "overrides", "seeds", "rows", "axes", "table"}
SEED_KEY = "run.seed"
ROW_KEYS = {"label", "name", "set", "paper"}
COLUMN_KEYS = {"key", "tag", "config", "reduce", "scale", "header", "format"}
TABLE_KEYS = {"label", "columns", "plot", "curve"}
REDUCTIONS = ("last", "first", "min", "max", "mean", "median")
DEFAULT_COLUMNS = ["val/fid (last)", "perf/tokens_per_s (median)"]


@dataclasses.dataclass(frozen=True)
class Column:
    """One table column: a reduced TensorBoard scalar (``tag``) or a value of the run's config (``config``)."""

    key: str
    header: str
    tag: str | None = None
    config: str | None = None
    reduce: str = "last"
    scale: float = 1.0
    format: str = ".2f"


@dataclasses.dataclass(frozen=True)
class TableSpec:
    label: str
    columns: list[Column]
    # (x column key, y column key), or None for no plot
    plot: tuple[str, str] | None
    # a scalar tag drawn over training steps, one line per row (mean of its seeds), or None
    curve: str | None = None


@dataclasses.dataclass
class Run:
    name: str
    label: str
    # every override in precedence order (later wins), values as typed YAML values
    overrides: dict[str, Any]
    # the keys this row/axis point sets itself: what tells the rows apart
    varied: dict[str, Any]
    paper: dict[str, float]
    # the training seed when the grid repeats its rows over seeds, else None
    seed: int | None = None


@dataclasses.dataclass
class Grid:
    name: str
    path: Path
    description: str
    base: Path | None
    runs: list[Run]
    table: TableSpec


class GridError(ValueError):
    """A grid file or command line that cannot be expanded; the message says what to change."""


def slugify(text: str) -> str:
    """Lower-case, filesystem-safe: runs of anything but ``[a-z0-9._]`` become one ``-``."""
    return re.sub(r"[^a-z0-9._]+", "-", str(text).lower()).strip("-.")


def format_value(value: Any) -> str:
    """``value`` as the right-hand side of a ``key=value`` override that OmegaConf reads back unchanged."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        text = repr(value)
        # YAML 1.1 reads "1e-05" as a string: the mantissa needs a dot
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:
            text = f"{mantissa}.0e{exponent}"
        return text
    if isinstance(value, str):
        if value and "\n" not in value and parse_value(value) == value:
            return value
        return json.dumps(value)
    return json.dumps(value)


def parse_value(text: str) -> Any:
    """A command-line override value, read as the trainer's OmegaConf reads it (``1e-4`` is a float)."""
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]), resolve=False)["v"]
    except Exception:  # whatever OmegaConf cannot read, the trainer gets verbatim
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a.b": 1, "c": "x"}``; the run name and output folder are the runner's."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise GridError(f"override {item!r} is not of the form dotted.key=value")
        if key in ("run.name", "run.out_dir"):
            raise GridError(f"override {key} is set by the grid runner; use --out DIR for the output folder")
        out[key] = parse_value(value)
    return out


def _value_part(leaf: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"{leaf}-{'on' if value else 'off'}"
    if value is None:
        return f"{leaf}-none"
    if isinstance(value, (int, float)):
        return f"{leaf}{format_value(value)}"
    return f"{leaf}-{value}"


def _reject_unknown(mapping: dict, allowed, what: str) -> None:
    """GridError naming ``mapping``'s keys outside ``allowed``; ``what`` says where (``file: row 2``)."""
    unknown = sorted(set(mapping) - set(allowed))
    if unknown:
        raise GridError(f"{what} has unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _parse_column(spec: Any, index: int, where: str) -> Column:
    if isinstance(spec, str):
        text = spec.strip()
        if text.startswith("config:"):
            key = text[len("config:"):].strip()
            return Column(key=key.rsplit(".", 1)[-1], header=key, config=key)
        m = re.fullmatch(r"(\S+)\s*(?:\((\w+)\))?", text)
        if not m:
            raise GridError(f"{where}: column {index} {spec!r} is not 'TAG (REDUCE)' or 'config:KEY'")
        tag, how = m.group(1), m.group(2) or "last"
        spec = {"tag": tag, "reduce": how, "header": text}
    if not isinstance(spec, dict):
        raise GridError(f"{where}: column {index} must be a string or a mapping, got {spec!r}")
    _reject_unknown(spec, COLUMN_KEYS, f"{where}: column {index}")
    if ("tag" in spec) == ("config" in spec):
        raise GridError(f"{where}: column {index} needs exactly one of `tag` (a scalar) or `config` (a key)")
    source = spec.get("tag") or spec["config"]
    how = spec.get("reduce", "last")
    if how not in REDUCTIONS:
        raise GridError(f"{where}: column {index} has reduce={how!r}; choose one of {list(REDUCTIONS)}")
    key = spec.get("key") or source.rsplit("/", 1)[-1].rsplit(".", 1)[-1]
    return Column(key=str(key), header=str(spec.get("header", f"{source} ({how})" if "tag" in spec else source)),
                  tag=spec.get("tag"), config=spec.get("config"), reduce=how,
                  scale=float(spec.get("scale", 1.0)), format=str(spec.get("format", ".2f")))


def _parse_table(spec: Any, where: str) -> TableSpec:
    spec = spec or {}
    if not isinstance(spec, dict):
        raise GridError(f"{where}: `table` must be a mapping with label/columns/plot")
    _reject_unknown(spec, TABLE_KEYS, f"{where}: `table`")
    columns = [_parse_column(c, i, where) for i, c in enumerate(spec.get("columns") or DEFAULT_COLUMNS)]
    keys = [c.key for c in columns]
    if len(set(keys)) != len(keys):
        raise GridError(f"{where}: table column keys {keys} repeat; give each column a distinct `key`")
    plot = spec.get("plot")
    if plot is None:
        ys = [c.key for c in columns if c.tag == "val/fid"]
        xs = [c.key for c in columns if c.tag and c.tag.startswith("perf/")]
        plot = (xs[0], ys[0]) if xs and ys else None
    else:
        if not isinstance(plot, dict) or set(plot) != {"x", "y"}:
            raise GridError(f"{where}: `table.plot` must be {{x: COLUMN_KEY, y: COLUMN_KEY}}")
        for axis in ("x", "y"):
            if plot[axis] not in keys:
                raise GridError(f"{where}: table.plot.{axis}={plot[axis]!r} is not a column key; keys: {keys}")
        plot = (plot["x"], plot["y"])
    curve = spec.get("curve")
    if curve is not None and not isinstance(curve, str):
        raise GridError(f"{where}: `table.curve` must be a scalar tag, e.g. val/fid_curve")
    return TableSpec(label=str(spec.get("label", "run")), columns=columns, plot=plot, curve=curve)


def _flat_mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise GridError(f"{what} must be a mapping of dotted.key -> value")
    return dict(value)


def parse_seeds(value: Any, where: str) -> list[int] | None:
    """A grid's ``seeds``: a count N (seeds 0..N-1) or a list of distinct seeds; None when absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not (isinstance(value, int) or isinstance(value, list) and value):
        raise GridError(f"{where}: `seeds` must be a count (3 = seeds 0, 1, 2) or a list of seeds, got {value!r}")
    seeds = list(range(value)) if isinstance(value, int) else value
    if not seeds or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in seeds):
        raise GridError(f"{where}: `seeds` must be >= 1 or a list of integers >= 0, got {value!r}")
    if len(set(seeds)) != len(seeds):
        raise GridError(f"{where}: `seeds` {seeds} repeats a seed")
    return seeds


def load_grid(path: str | os.PathLike, extra: dict[str, Any] | None = None, seeds: int | None = None) -> Grid:
    """Read grid file ``path`` and expand it into runs; ``extra`` overrides win over everything in the file.

    ``seeds`` (``run.py ablate --seeds N``) replaces the file's ``seeds``: every row is trained with seeds
    0..N-1, each into its own folder ``<grid>-<row>-s<seed>``."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file {str(path)!r} does not exist (grids live in configs/ablations/)")
    where = str(path)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except yaml.YAMLError as err:
        raise GridError(f"{where} is not valid YAML (write ??? in block style, `key: ???`): {err}") from None
    if not isinstance(raw, dict):
        raise GridError(f"{where}: a grid file is a mapping with keys {sorted(GRID_KEYS)}")
    _reject_unknown(raw, GRID_KEYS, f"{where}: the grid file")
    if ("rows" in raw) == ("axes" in raw):
        raise GridError(f"{where}: give exactly one of `rows` (explicit list) or `axes` (Cartesian product)")
    grid_name = slugify(raw.get("name") or path.stem)
    base = None
    if raw.get("base"):
        base = (path.parent / raw["base"]).resolve()
        if not base.is_file():
            raise GridError(f"{where}: base config {raw['base']!r} not found (looked at {base}); "
                            "`base` is relative to the grid file")
    common = _flat_mapping(raw.get("overrides"), f"{where}: `overrides`")
    extra = dict(extra or {})
    seed_list = parse_seeds(seeds if seeds is not None else raw.get("seeds"), where)
    if seed_list is not None and SEED_KEY in extra:
        raise GridError(f"{where}: the grid repeats its rows over seeds {seed_list}; drop the override "
                        f"{SEED_KEY}={extra[SEED_KEY]} (or --seeds)")
    table = _parse_table(raw.get("table"), where)

    points = []  # (row part of the name, label, varied settings, paper numbers)
    if "rows" in raw:
        rows = raw["rows"]
        if not isinstance(rows, list) or not rows:
            raise GridError(f"{where}: `rows` must be a non-empty list of {{label, set, ...}} mappings")
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or "label" not in row:
                raise GridError(f"{where}: row {i} must be a mapping with at least a `label`")
            _reject_unknown(row, ROW_KEYS, f"{where}: row {i} ({row['label']!r})")
            paper = _flat_mapping(row.get("paper"), f"{where}: row {i} `paper`")
            unknown_cols = sorted(set(paper) - {c.key for c in table.columns})
            if unknown_cols:
                raise GridError(f"{where}: row {i} `paper` names {unknown_cols}, which are not table column keys "
                                f"{[c.key for c in table.columns]}")
            part = slugify(row.get("name") or row["label"])
            if not part:
                raise GridError(f"{where}: row {i} label {row['label']!r} gives an empty run name; add `name:`")
            points.append((part, str(row["label"]),
                           _flat_mapping(row.get("set"), f"{where}: row {i} `set`"), paper))
    else:
        axes = _flat_mapping(raw["axes"], f"{where}: `axes`")
        if not axes or not all(isinstance(v, list) and v for v in axes.values()):
            raise GridError(f"{where}: `axes` must map each dotted key to a non-empty list of values")
        leaves = {k: k.rsplit(".", 1)[-1] for k in axes}
        if len(set(leaves.values())) != len(leaves):
            # two axes ending in the same word: fall back to the full dotted key in names
            leaves = {k: k for k in axes}
        for combo in itertools.product(*axes.values()):
            setting = dict(zip(axes, combo))
            part = slugify("-".join(_value_part(leaves[k], v) for k, v in setting.items()))
            label = ", ".join(f"{leaves[k]}={format_value(v)}" for k, v in setting.items())
            points.append((part, label, setting, {}))

    runs, seen = [], {}
    for part, label, setting, paper in points:
        name = f"{grid_name}-{part}"
        if name in seen:
            raise GridError(f"{where}: rows {seen[name]!r} and {label!r} both give run name {name!r}; "
                            "give one of them a distinct `name:`")
        seen[name] = label
        overrides = {**common, **setting, **extra}
        if seed_list is None:
            runs.append(Run(name=name, label=label, overrides=overrides, varied=dict(setting), paper=paper))
            continue
        if SEED_KEY in setting:
            raise GridError(f"{where}: row {label!r} sets {SEED_KEY}, but the grid repeats every row over `seeds`")
        for seed in seed_list:
            runs.append(Run(name=f"{name}-s{seed}", label=label, overrides={**overrides, SEED_KEY: seed},
                            varied=dict(setting), paper=paper, seed=seed))
    return Grid(name=grid_name, path=path, description=str(raw.get("description") or "").strip(),
                base=base, runs=runs, table=table)


def select(grid: Grid, patterns: list[str] | None) -> Grid:
    """``grid`` with only the runs whose names match one of the shell ``patterns`` (all runs for None)."""
    if not patterns:
        return grid
    runs = [run for run in grid.runs if any(fnmatch.fnmatchcase(run.name, p) for p in patterns)]
    return dataclasses.replace(grid, runs=runs)


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


def _recorded_overrides(run: Run) -> dict[str, str]:
    return {k: format_value(v) for k, v in run.overrides.items()}


def _base_name(grid: Grid) -> str | None:
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


def _pixels(run: Run) -> int:
    """Pixels per image if the run's overrides set ``data.resolution`` (an int or [H, W]), else 0."""
    res = run.overrides.get("data.resolution")
    if isinstance(res, int):
        return res * res
    if isinstance(res, (list, tuple)) and len(res) == 2 and all(isinstance(r, int) for r in res):
        return res[0] * res[1]
    return 0


def shared_runs(grids: list[Grid], out: Path) -> dict[str, str]:
    """Run name -> the name of the run it repeats (earlier in ``grids``, or finished in ``out``).

    Only a run without a folder of its own (or already such a link) is shared.
    """
    owner = _finished_runs(out)
    shared: dict[str, str] = {}
    for grid in grids:
        for run in grid.runs:
            key = _identity(_base_name(grid), _recorded_overrides(run))
            first = owner.setdefault(key, run.name)
            own = out / run.name
            if first != run.name and (own.is_symlink() or not own.exists()):
                shared[run.name] = first
    return shared


def run_state(run: Run, out: Path) -> str:
    """``done`` (skip), ``failed`` / ``partial`` (resume in place), ``stale`` (move aside, restart) or ``new``."""
    run_dir = out / run.name
    want = _recorded_overrides(run)
    done = read_marker(run_dir, DONE)
    if done is not None:
        return "done" if done.get("overrides") == want else "stale"
    started = read_marker(run_dir, STARTED)
    if started is None:
        return "stale" if run_dir.exists() else "new"
    if started.get("overrides") != want:
        return "stale"
    return "failed" if (run_dir / FAILED).exists() else "partial"


def _move_aside(run_dir: Path) -> Path:
    k = 1
    while run_dir.with_name(f"{run_dir.name}.prev-{k}").exists():
        k += 1
    target = run_dir.with_name(f"{run_dir.name}.prev-{k}")
    run_dir.rename(target)
    return target


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
             runner: list[str] | None = None, dry_run: bool = False, echo=print) -> int:
    """Train every unfinished run of ``grids`` into ``out``, ``pack`` at once on each GPU; returns 1 if any run
    failed, else 0."""
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
    missing = sorted({k for run in todo for k, v in run.overrides.items() if v == MISSING_VALUE})

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
            moved = _move_aside(run_dir)
            say(run, f"stale folder (other overrides or not started by this runner) moved to {moved.name}")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / FAILED).unlink(missing_ok=True)
        grid = grid_of[run.name]
        cmd = command_for(grid, run, out, runner)
        resumed = state in ("failed", "partial")
        # the most runs that ever shared this run's GPU: its throughput and memory then measure a shared GPU
        shared_gpu = max(min(pack, len(todo)), ((read_marker(run_dir, STARTED) or {}) if resumed else {}).get("pack", 1))
        (run_dir / STARTED).write_text(json.dumps({"command": cmd, "overrides": _recorded_overrides(run),
                                                   "base": _base_name(grid), "pack": shared_gpu}, indent=1))
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
        record = {"command": cmd, "overrides": _recorded_overrides(run),
                  "exit_code": code, "seconds": round(seconds, 1), "gpu": gpu, "pack": shared_gpu}
        (run_dir / (DONE if code == 0 else FAILED)).write_text(json.dumps(record, indent=1))
        with lock:
            results[run.name] = (code, seconds)
        if code == 0:
            say(run, f"done in {_fmt_seconds(seconds)}")
        else:
            say(run, f"FAILED (exit {code}) after {_fmt_seconds(seconds)}; log: {run_dir / LOG}")

    stop = threading.Event()

    def worker(gpu: str | None, finished: threading.Event) -> None:
        while not stop.is_set():
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
    names = " + ".join(grid.name for grid in grids)
    echo(f"{names}: {total} runs, {skipped} skipped (finished or shared), {len(results) - len(failed)} done, "
         f"{len(failed)} failed", flush=True)
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
        if args.only and not any(grid.runs for grid in grids):
            raise GridError(f"--only {' '.join(args.only)} matches no run; `--dry-run` lists the run names")
        grids = [grid for grid in grids if grid.runs]
        runner = shlex.split(args.runner) if args.runner else None
        return run_grid(grids, args.out, gpus=args.gpus, pack=args.pack, runner=runner, dry_run=args.dry_run)
    except GridError as err:
        print(f"run.py ablate: error: {err}", file=sys.stderr)
        return 2
