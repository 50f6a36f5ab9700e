"""Sweep analysis: ``results.csv`` I/O, transfer error (Algorithm 1), per-group optima and the
paper's plots (Fig. 1b loss against LR per width; HP-interdependence heatmaps).

Pure numpy + matplotlib (object-oriented API on the Agg canvas: no pyplot state, no display).

``results.csv`` (written by ``umup_jax.sweep``) has one row per training run with the columns
``run_id, sweep, group, parametrization, width, depth, steps, batch_size, seq_len, lr,
hp.<name>..., seed, final_train_loss, final_eval_loss, diverged, wall_time_s`` (plus
``weight_decay`` and the JSON ``overrides`` string in the current ``sweep.py``).

Conventions used by every function here:

- **Diverged is +inf.**  A run with ``diverged`` set, or whose loss is NaN, ±inf or missing,
  has loss +inf (spec §0.1: "NaN/inf = diverged").
- **Missing is NaN.**  In a loss table, a combination with no run at all is NaN.  Algorithm 1
  itself treats NaN like +inf; :func:`interdependence_errors` refuses incomplete grids.
- **Repeats are averaged.**  Several runs in one cell (seeds, or the all-default run repeated in
  several sweeps) are averaged; if any of them diverged the cell is +inf.  Runs that differ in
  any *other* configuration column (``lr``, ``width``, ``hp.*`` ...) are never averaged: that
  raises ``ValueError`` asking for a ``where=`` filter.
- **HP names.**  ``attn_mult`` and ``hp.attn_mult`` both name the column ``hp.attn_mult``.
- **Order.**  Values are sorted ascending; parametrizations go sp, mup, umup, then the rest.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import pathlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

STRING_COLUMNS = ("run_id", "sweep", "group", "parametrization", "overrides",
                  "data_fingerprint", "error")
INT_COLUMNS = ("width", "depth", "steps", "batch_size", "seq_len", "seed")
# Columns that define a configuration (with every hp.*): runs differing in one are not repeats.
CONFIG_COLUMNS = ("parametrization", "width", "depth", "steps", "batch_size", "seq_len", "lr",
                  "weight_decay")
PARAM_ORDER = ("sp", "sp_emb_lr", "mup", "umup")  # sp_emb_lr: SP with emb_lr_scaling
DEFAULT_Y = "final_eval_loss"

Rows = Sequence[Mapping[str, Any]]
Where = Mapping[str, Any] | Callable[[Mapping[str, Any]], bool] | None


# ---------------------------------------------------------------------------------------------
# CSV I/O


def read_results(path) -> list[dict]:
    """Reads ``results.csv`` into one dict per run.

    Parsing: ``run_id, sweep, group, parametrization, overrides, data_fingerprint, error``
    stay strings (an empty ``error``: the run did not fail); ``diverged`` becomes a
    bool ('1'/'true'/'yes' → True, '0'/'' → False); every other cell is a float ('' and 'nan'
    → nan, 'inf' → inf), and ``width, depth, steps, batch_size, seq_len, seed`` are ints when
    integral.  A cell that is not a number stays a string.
    """
    with open(path, newline="", encoding="utf-8") as f:
        return [_parse_row(raw) for raw in csv.DictReader(f)]


def _parse_row(raw: Mapping[str | None, Any]) -> dict:
    return {k.strip(): _parse_value(k.strip(), v) for k, v in raw.items() if k is not None}


def _parse_value(key: str, value: Any) -> Any:
    text = "" if value is None else str(value).strip()
    if key in STRING_COLUMNS:
        return text
    if key == "diverged":
        return _parse_bool(text)
    if text == "":
        return math.nan
    try:
        x = float(text)
    except ValueError:
        return text
    if key in INT_COLUMNS and x.is_integer():
        return int(x)
    return x


def _parse_bool(value: Any) -> bool:
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "0", "0.0", "false", "no"):
            return False
        if text in ("1", "1.0", "true", "yes"):
            return True
        return float(text) != 0.0
    return bool(value)


def write_csv(rows: Iterable[Mapping[str, Any]], path, columns: Sequence[str] | None = None):
    """Writes dicts as a CSV table (parents created).  Columns: ``columns``, else the union of
    the keys in first-seen order.  bool → 0/1, None → '', floats as ``repr`` (round-trips,
    'nan'/'inf' included).  Returns the path."""
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for r in rows:
            w.writerow([_format_cell(r.get(c)) for c in columns])
    return path


def _format_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return str(v)


# ---------------------------------------------------------------------------------------------
# Row helpers


def run_loss(row: Mapping[str, Any], y_key: str = DEFAULT_Y) -> float:
    """The loss of one run, +inf if it diverged or its loss is not a finite number."""
    if _parse_bool(row.get("diverged", False)):
        return math.inf
    y = row.get(y_key)
    try:
        y = float(y)
    except (TypeError, ValueError):
        return math.inf
    return y if math.isfinite(y) else math.inf


def resolve_key(rows: Rows, key: str) -> str:
    """``key`` if some row has it, else ``'hp.' + key``; KeyError listing the columns if
    neither exists (an empty ``rows`` resolves to ``key``)."""
    if not rows or any(key in r for r in rows):
        return key
    if any(f"hp.{key}" in r for r in rows):
        return f"hp.{key}"
    raise KeyError(f"no column {key!r} (or 'hp.{key}'); columns: {sorted(rows[0])}")


def select(rows: Rows, where: Where = None) -> list:
    """Rows passing ``where``: None (all), a predicate ``row -> bool``, or a dict
    ``{column: value}`` (floats compared with a 1e-9 relative tolerance, HP names resolved)."""
    if where is None:
        return list(rows)
    if callable(where):
        return [r for r in rows if where(r)]
    keys = {resolve_key(rows, k): v for k, v in where.items()}
    return [r for r in rows if all(_same(r.get(k), v) for k, v in keys.items())]


def _same(a: Any, b: Any) -> bool:
    if _is_number(a) and _is_number(b):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0) or (
            math.isnan(float(a)) and math.isnan(float(b)))
    return a == b


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _is_missing(v: Any) -> bool:
    return v is None or (_is_number(v) and math.isnan(float(v)))


def sort_key(v: Any):
    """Ascending order, with the parametrizations in the paper's order sp, mup, umup."""
    return (0, PARAM_ORDER.index(v), "") if v in PARAM_ORDER else (1, 0, v)


def _signature(row: Mapping[str, Any], exclude: Iterable[str]) -> tuple:
    exclude = set(exclude)
    cols = sorted(c for c in row if (c in CONFIG_COLUMNS or c.startswith("hp.")) and
                  c not in exclude)
    return tuple((c, "nan" if _is_missing(row[c]) else row[c]) for c in cols)


def _aggregate(values: Sequence[float]) -> float:
    """Mean of repeats; +inf if any repeat diverged."""
    return math.inf if any(math.isinf(v) for v in values) else float(np.mean(values))


def cell_losses(rows: Rows, keys: Sequence[str], y_key: str = DEFAULT_Y) -> dict[tuple, float]:
    """``{(row[k] for k in keys): aggregated loss}`` over rows whose key values are present.

    Repeats of one configuration are averaged (+inf if any diverged, see module docstring);
    rows that share the keys but differ in another configuration column raise ValueError."""
    losses: dict[tuple, list] = {}
    configs: dict[tuple, tuple] = {}
    for r in rows:
        cell = tuple(r.get(k) for k in keys)
        if any(_is_missing(v) for v in cell):
            continue
        sig = _signature(r, keys)
        if configs.setdefault(cell, sig) != sig:
            diff = sorted({c for c, _ in set(configs[cell]) ^ set(sig)})
            raise ValueError(f"runs at {dict(zip(keys, cell))} differ in {diff}; "
                             "restrict the rows with where=")
        losses.setdefault(cell, []).append(run_loss(r, y_key))
    return {cell: _aggregate(v) for cell, v in losses.items()}


# ---------------------------------------------------------------------------------------------
# Tables and optima


def loss_table(rows: Rows, fixed_key: str, transfer_key: str, y_key: str = DEFAULT_Y,
               where: Where = None) -> tuple[list, list, np.ndarray]:
    """Builds the matrix L[i_f, j_t] of Algorithm 1 from run rows.

    Returns ``(fixed_values, transfer_values, L)``: the distinct values of ``fixed_key`` and
    ``transfer_key`` (ascending, see :func:`sort_key`) and L of shape (n_fixed, n_transfer) with
    the aggregated ``y_key`` per cell: +inf where the run(s) diverged, NaN where no run exists.
    Rows whose fixed or transfer value is missing are ignored.
    """
    rows = select(rows, where)
    fk, tk = resolve_key(rows, fixed_key), resolve_key(rows, transfer_key)
    cells = cell_losses(rows, (fk, tk), y_key)
    fixed = sorted({f for f, _ in cells}, key=sort_key)
    transfer = sorted({t for _, t in cells}, key=sort_key)
    table = np.full((len(fixed), len(transfer)), np.nan)
    for (f, t), y in cells.items():
        table[fixed.index(f), transfer.index(t)] = y
    return fixed, transfer, table


def optimum_per_group(rows: Rows, group_keys: Sequence[str], x_key: str = "lr",
                      y_key: str = DEFAULT_Y, where: Where = None) -> list[dict]:
    """The best swept value of ``x_key`` for each group (e.g. ``('parametrization', 'width')``).

    One dict per group, groups in :func:`sort_key` order, with the group's key values and
    ``best_x`` = argmin_x loss(x) (first in ascending x on ties), ``best_loss``,
    ``log2_x`` = log2(best_x) (nan unless positive), ``on_edge`` (best_x is the smallest or
    largest value swept in that group: the optimum is not bracketed, spec §6.4), ``x_min``,
    ``x_max``, ``n_x`` (distinct values swept) and ``n_diverged``.  A group whose runs all
    diverged has ``best_x`` = nan, ``best_loss`` = inf and ``on_edge`` False.
    """
    rows = select(rows, where)
    keys = [resolve_key(rows, k) for k in group_keys]
    cells = cell_losses(rows, (*keys, resolve_key(rows, x_key)), y_key)
    groups: dict[tuple, dict] = {}
    for cell, y in cells.items():
        groups.setdefault(cell[:-1], {})[cell[-1]] = y
    ordered = sorted(groups, key=lambda g: tuple(sort_key(v) for v in g))
    return [_group_optimum(dict(zip(group_keys, g)), groups[g]) for g in ordered]


def _group_optimum(out: dict, curve: Mapping[Any, float]) -> dict:
    xs = sorted(curve, key=sort_key)
    ys = np.array([curve[x] for x in xs])
    i = _argmin_finite(ys)
    best = xs[i] if i is not None else math.nan
    out.update(best_x=best, best_loss=float(ys[i]) if i is not None else math.inf,
               log2_x=_log2(best), on_edge=i is not None and i in (0, len(xs) - 1),
               x_min=xs[0], x_max=xs[-1], n_x=len(xs), n_diverged=int(np.isinf(ys).sum()))
    return out


def _log2(v: Any) -> float:
    return math.log2(float(v)) if _is_number(v) and float(v) > 0 else math.nan


def _argmin_finite(values: np.ndarray) -> int | None:
    """First index of the minimum, NaN/inf treated as +inf; None if nothing is finite."""
    values = np.where(np.isfinite(values), values, np.inf)
    return int(np.argmin(values)) if np.isfinite(values).any() else None


# ---------------------------------------------------------------------------------------------
# Transfer error (Algorithm 1)


@dataclasses.dataclass(frozen=True)
class TransferError:
    """Result of :func:`transfer_error`.  Per-f lists are in the order of ``fixed_values``.

    err:           the transfer error (nan if undefined, +inf if some t_f diverges at f*).
    f_star/t_star: the reference cell (values); f_star_index/t_star_index: its indices.
    t_opt:         t_f = argmin_t L(f, ·) per f (a value; None for an all-diverged row).
    t_opt_index:   the same as indices.
    excess:        L(f*, t_f) − L(f*, t*) per f (0 for f*, nan for skipped rows).
    on_edge:       t_f is the first or last grid value (optimum not bracketed, spec §6.4).
    skipped:       the row is all-diverged, so t_f is undefined and the row is left out.
    """

    err: float
    f_star: Any
    t_star: Any
    f_star_index: int | None
    t_star_index: int | None
    t_opt: list
    t_opt_index: list
    excess: list
    on_edge: list
    skipped: list

    @property
    def any_on_edge(self) -> bool:
        return any(self.on_edge)

    @property
    def n_used(self) -> int:
        """Number of rows f ≠ f* that contributed to ``err``."""
        return sum(1 for i, s in enumerate(self.skipped) if not s and i != self.f_star_index)


def transfer_error(losses, fixed_values: Sequence | None = None,
                   transfer_values: Sequence | None = None, reference: Any = None
                   ) -> TransferError:
    """Transfer error, Algorithm 1 of the paper (spec §0.1, §6.4).

    ``losses[i, j]`` = L(f_i, t_j), the final validation loss with the 'fixed' quantity (an HP,
    or the width) at f_i and the 'transfer' HP at t_j, all other HPs at their defaults.
    NaN and ±inf mean diverged and count as +inf.  With n = len(F)::

        (f*, t*) = argmin_{(f, t) ∈ F×T} L(f, t)
        t_f      = argmin_{t ∈ T} L(f, t)                      for every f ≠ f*
        err      = 1/(n−1) · Σ_{f ≠ f*} [ L(f*, t_f) − L(f*, t*) ]

    i.e. the mean excess loss at f* of using the optimum found at another f; 0 means the
    optimum of t does not depend on f.

    - ``reference``: a value of ``fixed_values`` to use as f* instead of the global argmin
      (e.g. the largest width, the transfer target); t* is then argmin_t L(f*, t).
    - Ties: every argmin takes the first index in the given order; the global argmin scans
      row-major (first f, then first t within it).
    - All-diverged rows: t_f is undefined, so the row is skipped (``skipped[i]`` True) and the
      sum is divided by the number of rows that contributed (n−1 when none is skipped).
    - err is +inf when some t_f diverges at f*; nan when nothing is defined (n = 1, every
      other row all-diverged, the whole table diverged, or the reference row all-diverged).
    - ``fixed_values``/``transfer_values`` default to the indices 0..n−1 / 0..m−1.

    Raises ValueError if ``losses`` is not a non-empty numeric 2-D array, if the value lists do
    not match its shape, or if ``reference`` is not one of ``fixed_values``.
    """
    table = _loss_matrix(losses)
    fixed = _grid(fixed_values, table.shape[0], "fixed_values")
    transfer = _grid(transfer_values, table.shape[1], "transfer_values")
    t_idx = [_argmin_finite(row) for row in table]
    fi = _reference_index(table, fixed, reference)
    ti = None if fi is None else t_idx[fi]
    excess = [_excess(table, fi, ti, i, j) for i, j in enumerate(t_idx)]
    used = [e for i, e in enumerate(excess) if i != fi and t_idx[i] is not None]
    err = float(np.sum(used) / len(used)) if used and ti is not None else math.nan
    return TransferError(
        err=err, f_star=None if fi is None else fixed[fi],
        t_star=None if ti is None else transfer[ti], f_star_index=fi, t_star_index=ti,
        t_opt=[None if j is None else transfer[j] for j in t_idx], t_opt_index=t_idx,
        excess=excess, on_edge=[j is not None and j in (0, len(transfer) - 1) for j in t_idx],
        skipped=[j is None for j in t_idx])


def _loss_matrix(losses) -> np.ndarray:
    try:
        table = np.array(losses, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"losses must be a numeric 2-D array: {e}") from None
    if table.ndim != 2 or 0 in table.shape:
        raise ValueError(f"losses must be a non-empty 2-D array L[f, t], got shape {table.shape}")
    return np.where(np.isfinite(table), table, np.inf)


def _grid(values: Sequence | None, n: int, name: str) -> list:
    if values is None:
        return list(range(n))
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{name} has {len(values)} values but losses has {n} along that axis")
    return values


def _reference_index(table: np.ndarray, fixed: list, reference: Any) -> int | None:
    if reference is None:
        flat = _argmin_finite(table.ravel())
        return None if flat is None else flat // table.shape[1]
    hits = [i for i, f in enumerate(fixed) if _same(f, reference)]
    if len(hits) != 1:
        raise ValueError(f"reference {reference!r} must match exactly one of {fixed}")
    return hits[0]


def _excess(table: np.ndarray, fi: int | None, ti: int | None, i: int, j: int | None) -> float:
    if fi is None or ti is None or j is None:
        return math.nan
    return 0.0 if i == fi else float(table[fi, j] - table[fi, ti])


# ---------------------------------------------------------------------------------------------
# HP interdependence


def interdependence_errors(rows: Rows, hps: Sequence[str], y_key: str = DEFAULT_Y,
                           where: Where = None, defaults: Mapping[str, Any] | None = None,
                           allow_missing: bool = False) -> np.ndarray:
    """Transfer error for every ordered HP pair (spec §6.4: "report it per HP pair").

    ``M[i, j]`` = :func:`transfer_error` with ``hps[i]`` as the fixed HP and ``hps[j]`` as the
    transferred one, on the runs where every other HP of ``hps`` is at its default
    (``defaults[name]``, else 1.0: all μP and u-μP multipliers default to 1, spec §0.1; give
    ``lr`` explicitly if it is in ``hps``).  The diagonal is NaN.  A pair whose 2-D grid has
    missing cells (no run at all) is NaN unless ``allow_missing`` (then missing counts as
    diverged, as in Algorithm 1).
    """
    rows = select(rows, where)
    out = np.full((len(hps), len(hps)), np.nan)
    for i, a in enumerate(hps):
        for j, b in enumerate(hps):
            if i != j:
                out[i, j] = _pair_error(rows, hps, a, b, y_key, defaults or {}, allow_missing)
    return out


def _pair_error(rows, hps, a, b, y_key, defaults, allow_missing) -> float:
    others = {h: defaults.get(h, 1.0) for h in hps if h not in (a, b)}
    fixed, transfer, table = loss_table(rows, a, b, y_key, where=others)
    if table.size == 0 or (np.isnan(table).any() and not allow_missing):
        return math.nan
    return transfer_error(table, fixed, transfer).err


# ---------------------------------------------------------------------------------------------
# Plots


def _figure(n_panels: int = 1, panel_size=(4.6, 3.6)):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel_size[0] * n_panels, panel_size[1]), dpi=120)
    return fig, fig.subplots(1, n_panels, squeeze=False)[0]


def _save(fig, out_png) -> pathlib.Path:
    out = pathlib.Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    return out


def _short(name: str) -> str:
    return name[3:] if name.startswith("hp.") else name


def _axis_values(values: Sequence) -> tuple[np.ndarray, bool]:
    """(log2(values), True) when all are positive numbers, else (0..n−1, False)."""
    if values and all(_is_number(v) and float(v) > 0 for v in values):
        return np.log2(np.array(values, dtype=float)), True
    return np.arange(len(values), dtype=float), False


def _y_limits(tables: Iterable[np.ndarray], y_margin: float | None) -> tuple[float, float]:
    """Bottom just under the best loss; top at best + margin, so the basin stays readable.

    The automatic margin is max(2 × (spread of the per-row optima), 0.15 × |best|, 0.05),
    capped by the worst finite loss."""
    finite = [t[np.isfinite(t)] for t in tables]
    finite = np.concatenate(finite) if finite else np.array([])
    if finite.size == 0:
        return 0.0, 1.0
    row_min = [np.min(r[np.isfinite(r)]) for t in tables for r in t if np.isfinite(r).any()]
    lo = float(finite.min())
    margin = y_margin if y_margin is not None else max(
        2.0 * (max(row_min) - lo), 0.15 * abs(lo), 0.05)
    top = min(lo + margin, float(finite.max()))
    pad = 0.04 * (top - lo) if top > lo else 0.05
    return lo - pad, top + pad


def _err_text(te: TransferError | None) -> str:
    if te is None or math.isnan(te.err):
        return "transfer err n/a"
    text = f"transfer err {te.err:.3g}"
    return text + " (edge optimum)" if te.any_on_edge else text


def plot_loss_vs_lr(rows: Rows, out_png, y_key: str = DEFAULT_Y, title: str | None = None,
                    where: Where = None, y_margin: float | None = None,
                    reference: str | None = None, x_key: str = "lr", line_key: str = "width",
                    panel_key: str = "parametrization", x_label: str | None = None
                    ) -> dict[str, TransferError | None]:
    """Paper Fig. 1b: loss against log2(η), one panel per parametrization, one line per width.

    Each width's optimum is a star; diverged runs are 'x' marks at the top of the axis; losses
    above the y-limit (see :func:`_y_limits`) run off the top.  Each panel's title carries the
    transfer error (Algorithm 1 with width fixed, lr transferred); ``reference='largest'`` uses
    the largest width as f* (spec §6.4) instead of the global argmin.  Repeats are averaged; if
    the rows mix other sweeps, pass ``where`` (e.g. ``{'sweep': 'lr'}``).
    ``x_key``, ``line_key`` and ``panel_key`` replace lr, width and parametrization (e.g. the
    depth as lines, or an α on the x axis; ``x_label`` names it).
    Returns ``{panel value: TransferError | None}``; writes ``out_png``.
    """
    rows = select(rows, where)
    params = sorted({r.get(panel_key, "") for r in rows}, key=sort_key) or [""]
    tables = {p: loss_table([r for r in rows if r.get(panel_key, "") == p],
                            line_key, x_key, y_key) for p in params}
    ylim = _y_limits([t for _, _, t in tables.values()], y_margin)
    fig, axes = _figure(len(tables))
    errors = {}
    for ax, (p, (widths, lrs, table)) in zip(axes, tables.items()):
        errors[p] = _width_panel(ax, widths, lrs, table, ylim, reference, x_label or x_key)
        ax.set_title(f"{p or 'all'}: {_err_text(errors[p])}", fontsize=9)
        ax.set_ylabel(y_key if ax is axes[0] else "")
    axes[-1].legend(fontsize=7, title=_short(line_key), title_fontsize=7, loc="upper left",
                    bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    if title:
        fig.suptitle(title)
    _save(fig, out_png)
    return errors


def _width_panel(ax, widths, lrs, table, ylim, reference, x_name="lr"
                 ) -> TransferError | None:
    import matplotlib

    x, is_log = _axis_values(lrs)
    cmap = matplotlib.colormaps["viridis"]
    for i, w in enumerate(widths):
        color = cmap(0.85 * i / max(len(widths) - 1, 1))
        _curve(ax, x, table[i], ylim[1], color, label=str(w))
    ax.set_ylim(*ylim)
    ax.set_xlabel(x_name if x_name.startswith("log2") or not is_log else f"log2({x_name})")
    if not is_log:
        ax.set_xticks(x, [str(v) for v in lrs])
    ax.grid(alpha=0.3)
    ax.plot([], [], "*", color="grey", mec="k", label="optimum")
    ax.plot([], [], "x", color="grey", label="diverged")
    if table.size == 0 or len(widths) < 2:
        return None
    ref = max(widths) if reference == "largest" else reference
    return transfer_error(table, widths, lrs, reference=ref)


def _curve(ax, x, y, top, color, label) -> None:
    ok, div = np.isfinite(y), np.isinf(y)
    ax.plot(x[ok], y[ok], "o-", color=color, ms=3, lw=1.4, label=label)
    if div.any():  # an empty unclipped line would stretch tight_layout to the figure origin
        ax.plot(x[div], np.full(div.sum(), top), "x", color=color, ms=7, mew=2, clip_on=False)
    i = _argmin_finite(y)
    if i is not None:
        ax.plot(x[i], y[i], "*", color=color, mec="k", ms=13, zorder=5)


def plot_interdependence(rows: Rows, hp_a: str, hp_b: str, out_png, y_key: str = DEFAULT_Y,
                         where: Where = None, title: str | None = None,
                         y_margin: float | None = None) -> TransferError | None:
    """Heatmap of the loss over two HPs: rows = ``hp_a`` (fixed), columns = ``hp_b``
    (transferred), log2 axes when the values are positive.  White dots mark each row's optimum
    t_f, a red star the global optimum; vertically aligned dots mean independent HPs.  Diverged
    cells are grey with an 'x', missing cells grey.  The title carries the transfer error
    (:func:`transfer_error` on this table).  Returns it (None if fewer than 2 rows)."""
    fixed, transfer, table = loss_table(rows, hp_a, hp_b, y_key, where)
    if table.size == 0:
        raise ValueError(f"no runs with both {hp_a!r} and {hp_b!r}")
    te = transfer_error(table, fixed, transfer) if len(fixed) > 1 else None
    fig, (ax,) = _figure(1, (5.6, 4.4))
    vmin, vmax = _y_limits([table], y_margin)
    im = _heatmap(ax, table, vmin, vmax, "viridis")
    fig.colorbar(im, ax=ax, label=y_key)
    _annotate(ax, im, table, "{:.3f}", dy=0.25)
    _mark_optima(ax, table, te)
    _label_axes(ax, fixed, transfer, _short(hp_a), _short(hp_b))
    ax.set_title(title or f"{_short(hp_b)} vs {_short(hp_a)}: {_err_text(te)}", fontsize=9)
    _save(fig, out_png)
    return te


def _heatmap(ax, table, vmin, vmax, cmap_name):
    import matplotlib

    cmap = matplotlib.colormaps[cmap_name].with_extremes(bad="lightgrey")
    data = np.ma.masked_invalid(table)
    return ax.imshow(data, origin="lower", aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax,
                     interpolation="nearest")


def _annotate(ax, im, table, fmt: str, dy: float = 0.0) -> None:
    """Writes each cell's value (``dy`` below the centre), dark on light colours and vice
    versa; 'x' for diverged cells; nothing for missing ones or grids over 12×12."""
    if table.size > 144:
        return
    for (i, j), v in np.ndenumerate(table):
        light = np.isinf(v) or _is_light(im, v)
        text = "x" if np.isinf(v) else ("" if np.isnan(v) else fmt.format(v))
        ax.text(j, i - dy, text, ha="center", va="center", fontsize=7,
                color="k" if light else "white")


def _is_light(im, v: float) -> bool:
    if not np.isfinite(v):
        return True
    r, g, b, _ = im.cmap(im.norm(v))
    return 0.299 * r + 0.587 * g + 0.114 * b > 0.5


def _mark_optima(ax, table, te: TransferError | None) -> None:
    if te is None:
        return
    pts = [(j, i) for i, j in enumerate(te.t_opt_index) if j is not None]
    if pts:
        ax.plot(*zip(*pts), "o", mfc="white", mec="k", ms=5, label="row optimum t_f")
    if te.f_star_index is not None:
        ax.plot(te.t_star_index, te.f_star_index, "*", color="red", mec="k", ms=14,
                label="global optimum")
    ax.legend(fontsize=6, loc="upper right", framealpha=0.7)


def _label_axes(ax, fixed, transfer, name_a, name_b) -> None:
    for values, name, set_ticks, set_label in (
            (transfer, name_b, ax.set_xticks, ax.set_xlabel),
            (fixed, name_a, ax.set_yticks, ax.set_ylabel)):
        v, is_log = _axis_values(values)
        labels = [f"{x:g}" for x in v] if is_log else [str(x) for x in values]
        set_ticks(range(len(values)), labels)
        set_label(f"log2({name})" if is_log else name)


def plot_transfer_heatmap(matrix, names: Sequence[str], out_png, title: str | None = None):
    """Annotated heatmap of :func:`interdependence_errors`' matrix: row = fixed HP, column =
    transferred HP; NaN (diagonal, missing grids) grey, +inf shown as 'inf'.  Writes
    ``out_png`` and returns its path."""
    matrix = np.asarray(matrix, dtype=float)
    if matrix.ndim != 2 or matrix.shape != (len(names), len(names)):
        raise ValueError(f"matrix must be {len(names)}×{len(names)}, got {matrix.shape}")
    finite = matrix[np.isfinite(matrix)]
    vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    fig, (ax,) = _figure(1, (1.0 * len(names) + 3.0, 0.8 * len(names) + 2.4))
    im = _heatmap(ax, matrix, 0.0, vmax, "Reds")
    fig.colorbar(im, ax=ax, label="transfer error")
    _annotate(ax, im, np.where(np.isposinf(matrix), np.nan, matrix), "{:.3g}")
    for i, j in zip(*np.nonzero(np.isposinf(matrix))):
        ax.text(j, i, "inf", ha="center", va="center", fontsize=7)
    short = [_short(n) for n in names]
    ax.set_xticks(range(len(names)), short, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), short)
    ax.set_xlabel("transferred HP (t)")
    ax.set_ylabel("fixed HP (f)")
    ax.invert_yaxis()
    ax.set_title(title or "HP interdependence (Algorithm 1)", fontsize=9)
    return _save(fig, out_png)
