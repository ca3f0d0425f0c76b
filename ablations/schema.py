"""The grid file schema, shared by the runner (``ablations.grid``) and the table builder (``ablations.table``):
a YAML file that expands into named training runs and says what their table shows.

Grid file format (see also ``configs/ablations/README.md``)::

    name: table1a_small          # optional; defaults to the file name without ".yaml"
    description: free text       # optional; printed above the table
    base: ../base.yaml           # optional run config, relative to this file; passed first to `run.py fit`
    overrides:                   # dotted key -> value, applied to every run
      data.name: fashion_mnist
      train.max_steps: 500
    seeds: 3                     # optional: every row once per seed (0, 1, 2; or a list), each its own run
    inputs:                      # optional: NAME -> value, given on the command line as NAME=value
      init_128: ???              # (??? = required); a value "${init_128}" in the overrides or rows takes it
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

``inputs`` are values that differ between rows but come from the command line, such as the checkpoint each
resolution of a grid starts from: rows set ``train.init_from: "${init_128}"`` or ``"${init_256}"`` and the
user passes ``init_128=A.ckpt init_256=B.ckpt``. An input name is a word without dots (dotted keys are
config keys), a reference is a whole value ``"${NAME}"`` (quoted in a flow mapping) in ``overrides``, a row's
``set`` or an axis, and every declared input must be referenced. Input values are scalars; an input left at
``???`` is refused by the runner like any other ``???``.

Precedence, lowest first: ``base`` < ``overrides`` < the row's ``set`` (or the axis values) < extra
``key=value`` arguments of ``run.py ablate``. The runner appends ``run.name`` and ``run.out_dir``.

Run names are ``<grid name>-<row part>``; for axes the row part joins ``<leaf><value>`` per axis
(``topk8-levels2``; strings and booleans as ``<leaf>-<value>``, e.g. ``reorder-on``). With ``seeds`` (or
``run.py ablate --seeds N``) each row runs once per seed, as ``<grid name>-<row part>-s<seed>`` with
``run.seed=<seed>``, and the table reports each row's mean, standard deviation and count over its seeds.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

MISSING_VALUE = "???"
GRID_KEYS = {"name", "description", "base", "overrides", "seeds", "inputs", "rows", "axes", "table"}
SEED_KEY = "run.seed"
ROW_KEYS = {"label", "name", "set", "paper"}
COLUMN_KEYS = {"key", "tag", "config", "reduce", "scale", "header", "format"}
TABLE_KEYS = {"label", "columns", "plot", "curve"}
REDUCTIONS = ("last", "first", "min", "max", "mean", "median")
DEFAULT_COLUMNS = ["val/fid (last)", "perf/tokens_per_s (median)"]
INPUT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
INPUT_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


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
    # config key -> the grid input ("${NAME}") its value came from
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Grid:
    name: str
    path: Path
    description: str
    base: Path | None
    runs: list[Run]
    table: TableSpec
    # the grid's inputs: name -> value (from the command line, else the file's default, possibly ???)
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict)


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


def is_input_name(key: str) -> bool:
    """Whether a command-line ``key=value`` names a grid input rather than a (dotted) config key."""
    return "." not in key


def parse_inputs(spec: Any, given: dict[str, Any], where: str) -> dict[str, Any]:
    """A grid's ``inputs``: name -> value, the command line's ``NAME=value`` over the file's default."""
    inputs = _flat_mapping(spec, f"{where}: `inputs`")
    for name in inputs:
        if not INPUT_NAME.fullmatch(name):
            raise GridError(f"{where}: input name {name!r} must be a word (letters, digits, _) without dots; "
                            "dotted keys are config keys")
    values = {name: given.get(name, default) for name, default in inputs.items()}
    for name, value in values.items():
        if isinstance(value, (dict, list)):
            source = "on the command line" if name in given else "in `inputs`"
            raise GridError(f"{where}: input {name} must be a single value (a path, number, true/false or null), "
                            f"got {value!r} {source}")
    return values


def _fill_inputs(setting: dict[str, Any], inputs: dict[str, Any], used: set[str], filled: dict[str, str],
                 what: str) -> dict[str, Any]:
    """``setting`` with every ``"${NAME}"`` value replaced by input NAME's value; records the names ``used``
    and, per config key, the input it was ``filled`` from."""
    out = {}
    for key, value in setting.items():
        if isinstance(value, str) and INPUT_REF.search(value):
            m = INPUT_REF.fullmatch(value)
            if not m:
                raise GridError(f"{what}: {key}={value!r}: an input reference \"${{NAME}}\" must be the whole "
                                "value")
            name = m.group(1)
            if name not in inputs:
                raise GridError(f"{what}: {key}={value!r} names no input of this grid; declare it under `inputs:` "
                                f"(declared: {sorted(inputs) or 'none'})")
            used.add(name)
            filled[key] = name
            value = inputs[name]
        else:
            # a plain value here replaces one an earlier level took from an input
            filled.pop(key, None)
        out[key] = value
    return out


def load_grid(path: str | os.PathLike, extra: dict[str, Any] | None = None, seeds: int | None = None) -> Grid:
    """Read grid file ``path`` and expand it into runs; ``extra`` overrides win over everything in the file.

    Keys of ``extra`` without a dot are input values (``init_128=...``); those this grid does not declare are
    left for the other grids of the call (``run.py ablate`` refuses one that no grid declares).

    ``seeds`` (``run.py ablate --seeds N``) replaces the file's ``seeds``: every row is trained with seeds
    0..N-1, each into its own folder ``<grid>-<row>-s<seed>``."""
    path = Path(path)
    if not path.is_file():
        raise GridError(f"grid file {str(path)!r} does not exist (grids live in configs/ablations/)")
    where = str(path)
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except yaml.YAMLError as err:
        raise GridError(f"{where} is not valid YAML (write ??? in block style, `key: ???`, and quote \"${{NAME}}\" "
                        f"in a flow mapping): {err}") from None
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
    extra = dict(extra or {})
    given = {k: extra.pop(k) for k in list(extra) if is_input_name(k)}
    inputs = parse_inputs(raw.get("inputs"), given, where)
    used: set[str] = set()
    common_from: dict[str, str] = {}
    common = _fill_inputs(_flat_mapping(raw.get("overrides"), f"{where}: `overrides`"), inputs, used, common_from,
                          f"{where}: `overrides`")
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
            filled = dict(common_from)
            setting = _fill_inputs(_flat_mapping(row.get("set"), f"{where}: row {i} `set`"), inputs, used, filled,
                                   f"{where}: row {i} ({row['label']!r})")
            points.append((part, str(row["label"]), setting, paper, filled))
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
            filled = dict(common_from)
            setting = _fill_inputs(setting, inputs, used, filled, f"{where}: `axes`")
            points.append((part, label, setting, {}, filled))
    unused = sorted(set(inputs) - used)
    if unused:
        raise GridError(f"{where}: input(s) {unused} are declared but no value uses them; reference one as "
                        f"\"${{{unused[0]}}}\" or drop it from `inputs`")

    runs, seen = [], {}
    for part, label, setting, paper, filled in points:
        name = f"{grid_name}-{part}"
        if name in seen:
            raise GridError(f"{where}: rows {seen[name]!r} and {label!r} both give run name {name!r}; "
                            "give one of them a distinct `name:`")
        seen[name] = label
        overrides = {**common, **setting, **extra}
        # a command-line value for the key itself wins over the input it came from
        filled = {k: v for k, v in filled.items() if k not in extra}
        if seed_list is None:
            runs.append(Run(name=name, label=label, overrides=overrides, varied=dict(setting), paper=paper,
                            inputs=filled))
            continue
        if SEED_KEY in setting:
            raise GridError(f"{where}: row {label!r} sets {SEED_KEY}, but the grid repeats every row over `seeds`")
        for seed in seed_list:
            runs.append(Run(name=f"{name}-s{seed}", label=label, overrides={**overrides, SEED_KEY: seed},
                            varied=dict(setting), paper=paper, seed=seed, inputs=filled))
    return Grid(name=grid_name, path=path, description=str(raw.get("description") or "").strip(),
                base=base, runs=runs, table=table, inputs=inputs)


def select(grid: Grid, patterns: list[str] | None) -> Grid:
    """``grid`` with only the runs whose names match one of the shell ``patterns`` (all runs for None)."""
    if not patterns:
        return grid
    runs = [run for run in grid.runs if any(fnmatch.fnmatchcase(run.name, p) for p in patterns)]
    return dataclasses.replace(grid, runs=runs)
