"""The table of an ablation grid, rebuilt from each run's ``config.yaml`` and TensorBoard events.

``run.py table GRID [--out DIR]`` writes ``{out}/{grid}/table.md``, ``table.csv`` (a line per row),
``runs.csv`` (a line per run) and a PNG of the grid's ``table.plot`` columns (``<y>_vs_<x>.png``, e.g.
FID against throughput), in the grid's row and column order, with the paper's numbers (rows' ``paper:``
entries) beside ours, and prints the Markdown. A row's runs are its seeds: cells give their mean ± sample
standard deviation and n; under the table, for each plotted column, a matrix of row-minus-row differences
marks those beyond two standard errors (``sqrt(s1²/n1 + s2²/n2)``), and the PNG draws ± one standard
deviation bars. With ``table.curve`` (e.g. ``val/fid_curve``) it also draws that scalar over training steps
per row and tabulates its value at the last step against three quarters of the steps.

Every scalar point is read (no downsampling); event files are searched recursively under
``{out}/{run}/`` and merged, ordered by step then wall time, so ``last`` is the point of the
highest step. A run without a folder, or a tag without points, shows ``missing``, never a zero.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from ablations.checks import check_runs_found
from ablations.runs import DONE, FAILED, STARTED, read_marker
from ablations.schema import MISSING_VALUE, Column, Grid, GridError, load_grid

MISSING = "missing"
_ABSENT = object()


def read_scalars(run_dir: str | Path) -> dict[str, list[tuple[int, float, float]]]:
    """Every scalar point under ``run_dir``: tag -> [(step, wall_time, value)], sorted by step then time."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[str, list[tuple[int, float, float]]] = {}
    for path in sorted(Path(run_dir).rglob("events.out.tfevents.*")):
        # 0 = keep every point; the default reservoir keeps a random 10,000 per tag
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            points.setdefault(tag, []).extend((e.step, e.wall_time, e.value) for e in acc.Scalars(tag))
    for series in points.values():
        series.sort(key=lambda p: (p[0], p[1]))
    return points


def reduce(series: list[tuple[int, float, float]], how: str) -> float:
    values = np.array([p[2] for p in series], dtype=np.float64)
    if how == "last":
        return float(values[-1])
    if how == "first":
        return float(values[0])
    return float(getattr(np, how)(values))


def run_status(run_dir: Path) -> str:
    if not run_dir.exists():
        return MISSING
    if (run_dir / DONE).is_file():
        return "done"
    failed = read_marker(run_dir, FAILED)
    if failed is not None:
        return f"failed (exit {failed.get('exit_code', '?')})"
    return "unfinished"


def _config_differences(config: Any, varied: dict[str, Any]) -> list[str]:
    """Keys the row sets whose value in the run's resolved config is something else."""
    bad = []
    for key, want in varied.items():
        # None means "automatic", an interpolation resolves to something else and ??? is given on the command
        # line: nothing to compare
        if want is None or want == MISSING_VALUE or (isinstance(want, str) and "${" in want):
            continue
        got = OmegaConf.select(config, key, default=_ABSENT)
        if got is _ABSENT or got != want:
            bad.append(f"{key}={'absent' if got is _ABSENT else got}")
    return bad


def collect(grid: Grid, out: str | Path) -> list[dict[str, Any]]:
    """One record per run, in grid order: label, run, seed, status, per column key a float, value or None, and
    the points of ``table.curve`` (step, wall time, value)."""
    out = Path(out)
    records = []
    for run in grid.runs:
        run_dir = out / run.name
        record: dict[str, Any] = {"label": run.label, "run": run.name, "seed": run.seed, "status": run_status(run_dir),
                                  "values": {}, "paper": run.paper,
                                  "pack": int((read_marker(run_dir, STARTED) or {}).get("pack", 1))}
        scalars = read_scalars(run_dir) if run_dir.exists() else {}
        record["curve"] = scalars.get(grid.table.curve, []) if grid.table.curve else []
        config = None
        if (run_dir / "config.yaml").is_file():
            config = OmegaConf.load(run_dir / "config.yaml")
            # values from the grid's inputs were given to `run.py ablate`, not to this command
            diff = _config_differences(config, {k: v for k, v in run.varied.items() if k not in run.inputs})
            if diff:
                record["status"] += f"; config differs: {', '.join(diff)}"
        for col in grid.table.columns:
            value = None
            if col.tag is not None and scalars.get(col.tag):
                value = reduce(scalars[col.tag], col.reduce) * col.scale
            elif col.config is not None and config is not None:
                got = OmegaConf.select(config, col.config, default=_ABSENT)
                value = None if got is _ABSENT else got
            record["values"][col.key] = value
        records.append(record)
    return records


def _numbers(values: list[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]


def aggregate(grid: Grid, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per row (a row's seeds together), in grid order: label, runs, statuses, paper numbers, and per
    column key the values of its runs plus ``mean``, ``std`` (sample standard deviation, None below two
    values) and ``n``; a config column keeps its first run's value."""
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        row = rows.setdefault(r["label"], {"label": r["label"], "runs": [], "statuses": [], "paper": r["paper"],
                                           "values": {}, "stats": {}})
        row["runs"].append(r["run"])
        row["statuses"].append(r["status"])
        for key, value in r["values"].items():
            row["values"].setdefault(key, []).append(value)
    for row in rows.values():
        for col in grid.table.columns:
            values = row["values"][col.key]
            if col.config is not None:
                row["stats"][col.key] = {"value": next((v for v in values if v is not None), None)}
                continue
            xs = _numbers(values)
            row["stats"][col.key] = {"n": len(xs), "mean": float(np.mean(xs)) if xs else None,
                                     "std": float(np.std(xs, ddof=1)) if len(xs) > 1 else None}
    return list(rows.values())


def _fmt(value: float | None, col: Column) -> str:
    if value is None:
        return MISSING
    return "nan" if math.isnan(value) else format(value, col.format)


def _stat_cell(stats: dict, col: Column, runs: int) -> str:
    if col.config is not None:
        value = stats["value"]
        return MISSING if value is None else _fmt(value, col) if isinstance(value, float) else str(value)
    if not stats["n"]:
        return MISSING
    text = _fmt(stats["mean"], col)
    if stats["std"] is not None:
        text += f" ± {_fmt(stats['std'], col)}"
    if stats["n"] != runs:
        text += f" (n={stats['n']})"
    return text


def _status(statuses: list[str]) -> str:
    """``done`` for one run, ``3 done`` for three, ``2 done, 1 missing`` for a mix (in first-seen order)."""
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    if len(statuses) == 1:
        return statuses[0]
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def _runs_cell(runs: list[str]) -> str:
    if len(runs) == 1:
        return f"`{runs[0]}`"
    stem = runs[0].rsplit("-s", 1)[0]
    return f"`{stem}-s*` ({len(runs)})"


def _has_paper(rows: list[dict], col: Column) -> bool:
    return any(col.key in r["paper"] for r in rows)


def separated(a: dict, b: dict) -> tuple[float, float | None, bool]:
    """Mean difference ``a - b``, its standard error ``sqrt(s_a^2/n_a + s_b^2/n_b)`` and whether the
    difference exceeds two standard errors (None and False unless both have >= 2 values)."""
    diff = a["mean"] - b["mean"]
    if a["std"] is None or b["std"] is None:
        return diff, None, False
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    return diff, se, abs(diff) > 2 * se


def differences_markdown(rows: list[dict], col: Column) -> list[str]:
    """Row-minus-column mean differences of ``col``, bold where they exceed two standard errors."""
    have = [r for r in rows if r["stats"][col.key]["n"]]
    if len(have) < 2 or not any(r["stats"][col.key]["std"] is not None for r in have):
        return []
    lines = [f"### {col.header}: row minus column, bold beyond two standard errors", "",
             "| | " + " | ".join(f"({i + 1})" for i in range(len(have))) + " |",
             "|---|" + "---|" * len(have)]
    for i, a in enumerate(have):
        cells = []
        for j, b in enumerate(have):
            if i == j:
                cells.append("")
                continue
            diff, se, beyond = separated(a["stats"][col.key], b["stats"][col.key])
            text = _fmt(diff, col)
            cells.append(f"**{text}**" if beyond else text if se is not None else f"{text} (n<2)")
        lines.append(f"| ({i + 1}) {a['label']} | " + " | ".join(cells) + " |")
    pairs = [(a, b) for i, a in enumerate(have) for b in have[i + 1:]]
    beyond = sum(separated(a["stats"][col.key], b["stats"][col.key])[2] for a, b in pairs)
    lines += ["", f"{beyond} of {len(pairs)} pairs differ by more than two standard errors.", ""]
    return lines


def curve_points(records: list[dict]) -> dict[str, dict[int, list[float]]]:
    """Row label -> step -> the values of ``table.curve`` its runs logged at that step."""
    points: dict[str, dict[int, list[float]]] = {}
    for r in records:
        last: dict[int, float] = {}
        for step, _, value in r["curve"]:
            last[step] = value
        for step, value in last.items():
            points.setdefault(r["label"], {}).setdefault(step, []).append(value)
    return points


def plateau_markdown(grid: Grid, points: dict[str, dict[int, list[float]]]) -> list[str]:
    """Per row: the curve's mean at its last step and at the step nearest three quarters of it."""
    if not points:
        return []
    tag = grid.table.curve
    lines = [f"### {tag} over training: last step against three quarters of the steps", "",
             "| row | n | step ¾ | at ¾ | last step | at last | last / ¾ |", "|---|---|---|---|---|---|---|"]
    for label, by_step in points.items():
        steps = sorted(by_step)
        last = steps[-1]
        quarter = min(steps, key=lambda s: (abs(s - 0.75 * last), s))
        a, b = float(np.mean(by_step[quarter])), float(np.mean(by_step[last]))
        lines.append(f"| {label} | {len(by_step[last])} | {quarter} | {a:.2f} | {last} | {b:.2f} | {b / a:.3f} |")
    return lines + [""]


def to_markdown(grid: Grid, rows: list[dict], extra: list[str] = ()) -> str:
    cols = grid.table.columns
    header = [grid.table.label, "n"]
    for col in cols:
        header.append(col.header)
        if _has_paper(rows, col):
            header.append(f"{col.header} (paper)")
    header += ["status", "runs"]
    lines = [f"# {grid.name}", ""]
    if grid.description:
        lines += [grid.description, ""]
    lines += ["Cells: mean ± sample standard deviation over the row's runs (seeds); n: runs with results.", "",
              "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        done = max([r["stats"][c.key]["n"] for c in cols if c.config is None] or [0])
        cells = [r["label"], str(done)]
        for col in cols:
            cells.append(_stat_cell(r["stats"][col.key], col, done))
            if _has_paper(rows, col):
                paper = r["paper"].get(col.key)
                cells.append("–" if paper is None else _fmt(float(paper), col))
        cells += [_status(r["statuses"]), _runs_cell(r["runs"])]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines.append("")
    if grid.table.plot is not None:
        by_key = {c.key: c for c in cols}
        for key in reversed(grid.table.plot):
            lines += differences_markdown(rows, by_key[key])
    lines += list(extra)
    return "\n".join(lines).rstrip("\n") + "\n"


def packed_markdown(records: list[dict]) -> list[str]:
    """A note naming the runs that shared their GPU (``run.py ablate --pack``), if any."""
    packed = [f"{r['run']} ({r['pack']})" for r in records if r["pack"] > 1]
    if not packed:
        return []
    return ["Trained with other runs on the same GPU (up to that many at once, `run.py ablate --pack`): "
            + ", ".join(packed) + ". Their throughput and memory measure a shared GPU, not the method alone.",
            ""]


def to_csv(grid: Grid, rows: list[dict]) -> str:
    cols = grid.table.columns
    header = ["label", "runs", "status"]
    for col in cols:
        if col.config is not None:
            header.append(col.key)
        else:
            header += [f"{col.key}_mean", f"{col.key}_std", f"{col.key}_n"]
        if _has_paper(rows, col):
            header.append(f"{col.key}_paper")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        line = [r["label"], " ".join(r["runs"]), _status(r["statuses"])]
        for col in cols:
            stats = r["stats"][col.key]
            if col.config is not None:
                line.append(MISSING if stats["value"] is None else stats["value"])
            else:
                line += [MISSING if stats["mean"] is None else repr(stats["mean"]),
                         "" if stats["std"] is None else repr(stats["std"]), stats["n"]]
            if _has_paper(rows, col):
                line.append(r["paper"].get(col.key, ""))
        writer.writerow(line)
    return buf.getvalue()


def runs_csv(grid: Grid, records: list[dict]) -> str:
    """Every run's own values, one line per run (the seeds the table's means come from)."""
    cols = grid.table.columns
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["label", "run", "status", "pack"] + [c.key for c in cols])
    for r in records:
        values = [r["values"][c.key] for c in cols]
        writer.writerow([r["label"], r["run"], r["status"], r["pack"]] +
                        [MISSING if v is None else repr(v) if isinstance(v, float) else v for v in values])
    return buf.getvalue()


def plot(grid: Grid, rows: list[dict], records: list[dict], path: Path) -> None:
    """The ``table.plot`` columns: each row's mean with ± one standard deviation bars, its seeds as small
    dots, every row labelled; the paper's numbers as hollow markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, y_key = grid.table.plot
    cols = {c.key: c for c in grid.table.columns}
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    colors = plt.get_cmap("tab10")
    drawn = False
    for i, r in enumerate(rows):
        sx, sy = r["stats"][x_key], r["stats"][y_key]
        if not sx.get("n") or not sy.get("n"):
            continue
        color = colors(i % 10)
        seeds = [(x, y) for x, y in zip(r["values"][x_key], r["values"][y_key])
                 if isinstance(x, (int, float)) and isinstance(y, (int, float))]
        ax.scatter([p[0] for p in seeds], [p[1] for p in seeds], s=12, alpha=0.4, color=color)
        ax.errorbar(sx["mean"], sy["mean"], xerr=sx["std"] or 0, yerr=sy["std"] or 0, fmt="o", color=color,
                    capsize=3, label=f"{r['label']} (n={min(sx['n'], sy['n'])})")
        drawn = True
    paper = [(r["paper"].get(x_key), r["paper"].get(y_key), r["label"]) for r in rows]
    paper = [(x, y, label) for x, y, label in paper if isinstance(x, (int, float)) and isinstance(y, (int, float))]
    if paper:
        ax.scatter([p[0] for p in paper], [p[1] for p in paper], marker="s", facecolors="none",
                   edgecolors="tab:gray", label="paper")
        for x, y, label in paper:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color="tab:gray")
    absent = [r["label"] for r in rows if not r["stats"][x_key].get("n") or not r["stats"][y_key].get("n")]
    if absent:
        ax.text(0.01, 0.01, "missing: " + ", ".join(absent), transform=ax.transAxes, fontsize=7, va="bottom")
    ax.margins(x=0.15, y=0.12)
    ax.set_xlabel(cols[x_key].header)
    ax.set_ylabel(cols[y_key].header)
    ax.set_title(f"{grid.name}: mean ± 1 s.d. over seeds (dots: single seeds)")
    ax.grid(alpha=0.3)
    if drawn or paper:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(grid: Grid, points: dict[str, dict[int, list[float]]], path: Path) -> None:
    """``table.curve`` against training steps: each row's mean over its seeds, shaded ± one s.d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for label, by_step in points.items():
        steps = sorted(by_step)
        mean = np.array([np.mean(by_step[s]) for s in steps])
        std = np.array([np.std(by_step[s], ddof=1) if len(by_step[s]) > 1 else 0.0 for s in steps])
        line, = ax.plot(steps, mean, marker="o", markersize=3, label=f"{label} (n={len(by_step[steps[-1]])})")
        ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training step")
    ax.set_ylabel(grid.table.curve)
    ax.set_title(f"{grid.name}: {grid.table.curve}, mean ± 1 s.d. over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_table(grid: Grid, out: str | Path) -> dict[str, Path]:
    """Write table.md, table.csv, runs.csv and the plots into ``{out}/{grid}/``; returns the paths by kind."""
    records = collect(grid, out)
    rows = aggregate(grid, records)
    points = curve_points(records)
    folder = Path(out) / grid.name
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"md": folder / "table.md", "csv": folder / "table.csv", "runs": folder / "runs.csv"}
    paths["md"].write_text(to_markdown(grid, rows, packed_markdown(records) + plateau_markdown(grid, points)))
    paths["csv"].write_text(to_csv(grid, rows))
    paths["runs"].write_text(runs_csv(grid, records))
    if grid.table.plot is not None:
        x_key, y_key = grid.table.plot
        paths["png"] = folder / f"{y_key}_vs_{x_key}.png"
        plot(grid, rows, records, paths["png"])
    if points:
        paths["curve"] = folder / f"{grid.table.curve.replace('/', '_')}.png"
        plot_curves(grid, points, paths["curve"])
    return paths


def main_table(argv: list[str]) -> int:
    """``run.py table GRID [--out DIR]``: print the grid's table and write it as Markdown, CSV and PNG."""
    parser = argparse.ArgumentParser(prog="run.py table",
                                     description="Rebuild an ablation grid's table from its runs' TensorBoard logs.")
    parser.add_argument("grid", help="grid YAML file, e.g. configs/ablations/table1a_small.yaml")
    parser.add_argument("--out", default="runs", help="folder of the runs, as given to `run.py ablate` (default: runs)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    try:
        grid = load_grid(args.grid)
    except GridError as err:
        print(f"run.py table: error: {err}", file=sys.stderr)
        return 2
    check_runs_found(grid, args.out)
    paths = write_table(grid, args.out)
    print(paths["md"].read_text(), end="")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
