"""The table of an ablation grid, rebuilt from each run's ``config.yaml`` and TensorBoard events.

``run.py table GRID [--out DIR]`` writes ``{out}/{grid}/table.md``, ``table.csv`` and a PNG of the
grid's ``table.plot`` columns (``<y>_vs_<x>.png``, e.g. FID against throughput), in the grid's row and
column order, with the paper's numbers (rows' ``paper:`` entries) beside ours, and prints the Markdown.

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
from ablations.grid import DONE, FAILED, Column, Grid, GridError, load_grid, read_marker

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
        # None means "automatic" and an interpolation resolves to something else: nothing to compare
        if want is None or (isinstance(want, str) and "${" in want):
            continue
        got = OmegaConf.select(config, key, default=_ABSENT)
        if got is _ABSENT or got != want:
            bad.append(f"{key}={'absent' if got is _ABSENT else got}")
    return bad


def collect(grid: Grid, out: str | Path) -> list[dict[str, Any]]:
    """One record per run, in grid order: label, run, status, and per column key a float, value or None."""
    out = Path(out)
    records = []
    for run in grid.runs:
        run_dir = out / run.name
        record: dict[str, Any] = {"label": run.label, "run": run.name, "status": run_status(run_dir),
                                  "values": {}, "paper": run.paper}
        scalars = read_scalars(run_dir) if run_dir.exists() else {}
        config = None
        if (run_dir / "config.yaml").is_file():
            config = OmegaConf.load(run_dir / "config.yaml")
            diff = _config_differences(config, run.varied)
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


def _cell(value: Any, col: Column, empty: str) -> str:
    if value is None:
        return empty
    if isinstance(value, float):
        return "nan" if math.isnan(value) else format(value, col.format)
    return str(value)


def _has_paper(records: list[dict], col: Column) -> bool:
    return any(col.key in r["paper"] for r in records)


def to_markdown(grid: Grid, records: list[dict]) -> str:
    cols = grid.table.columns
    header = [grid.table.label]
    for col in cols:
        header.append(col.header)
        if _has_paper(records, col):
            header.append(f"{col.header} (paper)")
    header += ["status", "run"]
    lines = [f"# {grid.name}", ""]
    if grid.description:
        lines += [grid.description, ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in records:
        cells = [r["label"]]
        for col in cols:
            cells.append(_cell(r["values"][col.key], col, MISSING))
            if _has_paper(records, col):
                cells.append(_cell(r["paper"].get(col.key), col, "–"))
        cells += [r["status"], f"`{r['run']}`"]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(grid: Grid, records: list[dict]) -> str:
    cols = grid.table.columns
    header = ["label", "run", "status"]
    for col in cols:
        header.append(col.key)
        if _has_paper(records, col):
            header.append(f"{col.key}_paper")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in records:
        row = [r["label"], r["run"], r["status"]]
        for col in cols:
            value = r["values"][col.key]
            row.append(MISSING if value is None else repr(value) if isinstance(value, float) else value)
            if _has_paper(records, col):
                row.append(r["paper"].get(col.key, ""))
        writer.writerow(row)
    return buf.getvalue()


def plot(grid: Grid, records: list[dict], path: Path) -> None:
    """Scatter of the ``table.plot`` columns, every point labelled; the paper's numbers as hollow markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, y_key = grid.table.plot
    cols = {c.key: c for c in grid.table.columns}
    fig, ax = plt.subplots(figsize=(7, 5))
    for source, style in (("values", dict(marker="o", color="tab:blue", label="ours")),
                          ("paper", dict(marker="s", facecolors="none", edgecolors="tab:gray", label="paper"))):
        pts = [(r[source].get(x_key), r[source].get(y_key), r["label"]) for r in records]
        pts = [(x, y, label) for x, y, label in pts if isinstance(x, (int, float)) and isinstance(y, (int, float))]
        if not pts:
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], **style)
        for x, y, label in pts:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8,
                        color=style.get("color", "tab:gray"))
    absent = [r["label"] for r in records
              if not isinstance(r["values"].get(x_key), (int, float)) or not isinstance(r["values"].get(y_key),
                                                                                           (int, float))]
    if absent:
        ax.text(0.01, 0.01, "missing: " + ", ".join(absent), transform=ax.transAxes, fontsize=7, va="bottom")
    # room for the labels of the outermost points
    ax.margins(x=0.25, y=0.12)
    ax.set_xlabel(cols[x_key].header)
    ax.set_ylabel(cols[y_key].header)
    ax.set_title(grid.name)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_table(grid: Grid, out: str | Path) -> dict[str, Path]:
    """Write table.md, table.csv and the plot into ``{out}/{grid}/``; returns the paths by kind."""
    records = collect(grid, out)
    folder = Path(out) / grid.name
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"md": folder / "table.md", "csv": folder / "table.csv"}
    paths["md"].write_text(to_markdown(grid, records))
    paths["csv"].write_text(to_csv(grid, records))
    if grid.table.plot is not None:
        x_key, y_key = grid.table.plot
        paths["png"] = folder / f"{y_key}_vs_{x_key}.png"
        plot(grid, records, paths["png"])
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
