"""Width coordinate check (spec §10.4): RMS of activations, gradients and updates vs width.

    python -m umup_jax.coord_check --config=configs/umup_proxy.py[:ARG] \\
        --widths=64,128,256,512 --steps=3 --out=DIR
    python -m umup_jax.coord_check --config=… --after_training \\
        --widths=64,128,256 --depths=1,2,4,8 --out=DIR

(``--config.a.b=value`` overrides, ``--seed=N``; the flag conventions are those of
:mod:`umup_jax.cli`.)

For each width the config's model is rebuilt at that width with everything else unchanged:
same parametrization and HPs, same depth, sequence length and batch size, and the same head
size (the config's ``width / num_heads``), so the number of heads grows with width.  Each model
is trained for ``steps`` AdamW steps with the real optimizer (:func:`umup_jax.optim.
make_optimizer`) at the config's peak learning rate held constant (no warm-up or decay: "fixed
η", spec §10.4), on real batches from the config's data pipeline (the same batches, in the same
order, for every width).

A row at step ``t`` (t = 0 … steps) describes the training step taken from the parameters
``θ_t`` (θ_0 is the init) on batch ``t``:

* ``activation``: the RMS of every tensor the model ``sow``s (``embedding``,
  ``layer_i/attn_branch``, ``layer_i/ffn_norm``, ``layer_i/ffn_branch``, ``layer_i/output``,
  ``final_norm``, ``logits``) in the forward pass of θ_t;
* ``gradient``: the RMS of ∇L(θ_t) for every parameter tensor;
* ``update``: the RMS of ΔW = θ_{t+1} − θ_t for every parameter tensor.

So step 0 is "at init" (the first update included) and step ``steps`` is "after ``steps``
AdamW steps"; ``steps + 1`` optimizer steps are run to record it.  Under μP/u-μP the activation
and gradient curves are flat in width; under SP (a fixed init std) they drift.  ΔW of a hidden
weight is *meant* to shrink with width (Adam's per-entry update is η·C with C ∝ 1/√fan_in under
u-μP, 1/fan_in under μP): the flat quantity is its effect on the activations, which the
activation rows after step 0 show.

**After training** (``--after_training``, :func:`after_training`): the config's model is
trained for ``train.steps`` steps with its real schedule (warm-up, cosine to the final LR
fraction) at each width (depth fixed) and at each depth (width fixed), and the RMS of every
stored weight tensor and of every activation (on one fixed batch) is recorded at the end.  The
u-μP claim (paper §4) is that these stay stable as width and depth grow.  Outputs
``DIR/coord_check_after_training.csv`` (columns :data:`AFTER_FIELDS`, ``axis`` = width or
depth) and ``DIR/coord_check_after_training.png`` (rows: weights, activations; columns:
against width, against depth).

Outputs: ``DIR/coord_check.csv`` (columns :data:`CSV_FIELDS`) and ``DIR/coord_check.png`` (rows:
kind; columns: a few steps; x: width, log2; y: RMS, log; one line per tensor name with layers
averaged, plus the median over tensors), and a printed flatness summary
(:func:`flatness`: for each kind and step, max/min over widths of the median-over-tensors RMS).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import pathlib
import re
import time
from typing import Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax.core import meta as flax_meta

from umup_jax import cli
from umup_jax import data as data_lib
from umup_jax import failures
from umup_jax import layer_stack
from umup_jax import metrics as metrics_lib
from umup_jax import train as train_lib
from umup_jax.model import Decoder, ModelConfig, init_params
from umup_jax.optim import make_optimizer

KINDS = ("activation", "gradient", "update")
CSV_FIELDS = ("parametrization", "width", "step", "kind", "name", "rms")
AFTER_KINDS = ("weight", "activation")
AFTER_FIELDS = ("parametrization", "axis", "width", "depth", "steps", "kind", "name", "rms",
                "final_train_loss")
_LAYER = re.compile(r"^layer_\d+/")


# ---------------------------------------------------------------------------------------------
# Building the runs
# ---------------------------------------------------------------------------------------------


def head_dim_of(config: ml_collections.ConfigDict) -> int:
    """The config's head size: ``model.head_dim``, or ``model.width // model.num_heads``."""
    m = config.model
    return int(m.head_dim or m.width // m.num_heads)


def model_config_at_width(config: ml_collections.ConfigDict, vocab_size: int,
                          width: int) -> ModelConfig:
    """The config's model at ``width`` with its head size kept (heads = width / head size)."""
    head_dim = head_dim_of(config)
    if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or width <= 0:
        raise ValueError(f"width={width!r} is invalid: it must be an integer > 0")
    if width % head_dim:
        raise ValueError(
            f"width={width} is invalid: it must be a multiple of the config's head size "
            f"{head_dim} (model.width / model.num_heads), which the coordinate check keeps fixed"
        )
    base = train_lib.model_config(config, vocab_size)
    return base.replace(width=int(width), num_heads=int(width) // head_dim, head_dim=head_dim)


def optimizer_config(config: ml_collections.ConfigDict):
    """The config's AdamW at its peak learning rate, constant (no warm-up, no decay)."""
    return dataclasses.replace(train_lib.optimizer_config(config), schedule="constant",
                               warmup_steps=0)


def fixed_batches(config: ml_collections.ConfigDict, tokens: data_lib.TokenData,
                  count: int) -> list[dict[str, np.ndarray]]:
    """The first ``count`` training batches of the config's pipeline (shared by all widths)."""
    ds = data_lib.train_dataset(tokens.train, config.model.seq_len, config.train.batch_size,
                                seed=config.data.shuffle_seed)
    it = iter(ds)
    return [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(count)]


def _make_step(model: Decoder, tx: optax.GradientTransformation):
    """(params, opt_state, batch) → (params', opt_state', loss, {kind: {name: rms}})."""

    def step(params, opt_state, batch):
        def loss_fn(p):
            loss, mut = model.apply(p, batch["inputs"], batch["targets"], method=Decoder.loss,
                                    mutable=["intermediates"])
            return loss, mut["intermediates"]

        (loss, acts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        delta = jax.tree.map(lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32),
                             new_params, params)
        per_layer = layer_stack.unstack_layers  # scanned layers: named layer_<i> as a loop's
        stats = {
            "activation": metrics_lib.tree_rms(per_layer(acts), "x"),
            "gradient": metrics_lib.tree_rms(per_layer(grads["params"]), "x"),
            "update": metrics_lib.tree_rms(per_layer(delta["params"]), "x"),
        }
        return new_params, opt_state, loss, stats

    return jax.jit(step, donate_argnums=(0, 1))


def run_width(config: ml_collections.ConfigDict, tokens: data_lib.TokenData, width: int,
              batches: Sequence[dict[str, np.ndarray]], seed: int) -> tuple[list[dict], list]:
    """Trains the width-``width`` model on ``batches`` (one AdamW step per batch); returns
    (rows, the loss of each step)."""
    mcfg = model_config_at_width(config, tokens.vocab_size, width)
    model = Decoder(mcfg)
    init = functools.partial(init_params, model)
    boxed = jax.eval_shape(init, jax.random.key(seed))  # metadata only: no compute
    tx = make_optimizer(optimizer_config(config), boxed, mcfg.rule)
    # Jitted: an eager Flax init dispatches op by op and is slower than compiling it.
    params = jax.jit(lambda key: flax_meta.unbox(init(key)))(jax.random.key(seed))
    opt_state = tx.init(params)
    step_fn = _make_step(model, tx)
    rows, losses = [], []
    for t, batch in enumerate(batches):
        params, opt_state, loss, stats = step_fn(params, opt_state, batch)
        stats, loss = jax.device_get((stats, loss))
        losses.append(float(loss))
        for kind in KINDS:
            for name, value in sorted(stats[kind].items()):
                rows.append({"parametrization": mcfg.parametrization, "width": int(width),
                             "step": t, "kind": kind, "name": name[len("x/"):],
                             "rms": float(value)})
    return rows, losses


def coord_check(config: ml_collections.ConfigDict, widths: Iterable[int], steps: int,
                seed: Optional[int] = None, verbose: bool = False) -> list[dict]:
    """Rows ``{parametrization, width, step, kind, name, rms}`` for every width, every step
    0 … ``steps``, every kind of :data:`KINDS` and every tensor (see the module docstring)."""
    widths = [int(w) for w in widths]
    if not widths:
        raise ValueError("widths is empty: give one or more widths")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps={steps!r} is invalid: it must be an integer >= 0")
    train_lib.check_config(config)
    for w in widths:  # fail on a bad width before loading data or compiling
        model_config_at_width(config, max(int(config.model.vocab_size or 0), 2), w)
    seed = config.seed if seed is None else seed
    tokens = data_lib.load_tokens(config.data, cache_dir=config.data.cache_dir or None)
    batches = fixed_batches(config, tokens, steps + 1)
    rows = []
    for w in widths:
        t0 = time.time()
        width_rows, losses = run_width(config, tokens, w, batches, seed)
        rows.extend(width_rows)
        if verbose:
            print(f"  width {w:>5}: loss {losses[0]:.4f} (init) → {losses[-1]:.4f} "
                  f"(step {steps}), {time.time() - t0:.1f}s", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Output: CSV, summary, plot
# ---------------------------------------------------------------------------------------------


def write_csv(rows: Sequence[dict], path) -> pathlib.Path:
    return _write_rows(rows, path, CSV_FIELDS)


def _write_rows(rows: Sequence[dict], path, fields: Sequence[str]) -> pathlib.Path:
    """``rows`` as CSV with ``fields`` as columns; floats in full (``repr``) precision."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (repr(r[k]) if isinstance(r[k], float) else r[k])
                             for k in fields})
    return path


def read_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{**r, "width": int(r["width"]), "step": int(r["step"]), "rms": float(r["rms"])}
                for r in csv.DictReader(f)]


def layer_averaged(rows: Sequence[dict]) -> dict[tuple, dict[str, dict[int, float]]]:
    """{(kind, step): {name: {width: rms}}}, with ``layer_i/x`` merged into ``x`` (geometric
    mean over layers)."""
    acc: dict[tuple, dict[str, dict[int, list[float]]]] = {}
    for r in rows:
        name = _LAYER.sub("", r["name"])
        acc.setdefault((r["kind"], r["step"]), {}).setdefault(name, {}).setdefault(
            r["width"], []).append(r["rms"])
    return {key: {name: {w: float(np.exp(np.mean(np.log(np.maximum(v, 1e-30)))))
                         for w, v in by_w.items()} for name, by_w in names.items()}
            for key, names in acc.items()}


def median_curve(rows: Sequence[dict], kind: str, step: int) -> dict[int, float]:
    """{width: median over all tensors (every layer) of the RMS} for one kind and step."""
    by_w: dict[int, list[float]] = {}
    for r in rows:
        if r["kind"] == kind and r["step"] == step:
            by_w.setdefault(r["width"], []).append(r["rms"])
    return {w: float(np.median(v)) for w, v in sorted(by_w.items())}


def _slope(curve: dict[int, float]) -> float:
    """Least-squares slope of log2 RMS against log2 width (0: flat; 0.5: grows like √width)."""
    if len(curve) < 2:
        return 0.0
    x = np.log2(list(curve))
    y = np.log2(np.maximum(list(curve.values()), 1e-30))
    return float(np.polyfit(x, y, 1)[0])


def flatness(rows: Sequence[dict]) -> dict[tuple[str, int], dict[str, float]]:
    """{(kind, step): {'ratio': max/min over widths of the median-over-tensors RMS,
    'slope': its log2-log2 slope in width}} for every kind and step present."""
    out = {}
    steps = sorted({r["step"] for r in rows})
    for kind in KINDS:
        for step in steps:
            curve = median_curve(rows, kind, step)
            if curve:
                vals = list(curve.values())
                out[(kind, step)] = {"ratio": max(vals) / max(min(vals), 1e-30),
                                     "slope": _slope(curve)}
    return out


def summary(rows: Sequence[dict]) -> str:
    """The flatness numbers at init and at the last step, one line per kind."""
    if not rows:
        return "no rows"
    par = rows[0]["parametrization"]
    widths = sorted({r["width"] for r in rows})
    last = max(r["step"] for r in rows)
    flat = flatness(rows)
    lines = [f"{par}: flatness over widths {widths} = max/min over widths of the "
             "median-over-tensors RMS (slope: d log2 RMS / d log2 width)"]
    for kind in KINDS:
        parts = []
        for step in sorted({0, last}):
            f = flat.get((kind, step))
            if f:
                parts.append(f"step {step}: {f['ratio']:6.2f}x (slope {f['slope']:+.2f})")
        lines.append(f"  {kind:<10} " + "   ".join(parts))
    return "\n".join(lines)


def plot_steps(last: int) -> list[int]:
    """Columns of the plot: 0, a middle step when there are several, and the last."""
    if last <= 1:
        return sorted({0, last})
    return sorted({0, last // 2, last}) if last >= 4 else [0, last]


def plot_grid(rows: Sequence[dict], path, title: Optional[str] = None,
              steps: Optional[Sequence[int]] = None) -> pathlib.Path:
    """The grid plot (rows: kind; columns: steps) of RMS vs width, written to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    last = max(r["step"] for r in rows)
    steps = list(steps) if steps is not None else plot_steps(last)
    widths = sorted({r["width"] for r in rows})
    par = rows[0]["parametrization"]
    avg = layer_averaged(rows)
    kinds = [k for k in KINDS if any((k, s) in avg for s in steps)]
    fig, axes = plt.subplots(len(kinds), len(steps), figsize=(4.2 * len(steps) + 2.6,
                                                              3.2 * len(kinds)),
                             sharey="row", squeeze=False)
    cmap = plt.get_cmap("tab10")
    markers = "os^vD<>ph*"
    for i, kind in enumerate(kinds):
        names = sorted({n for s in steps for n in avg.get((kind, s), {})})
        for j, step in enumerate(steps):
            ax = axes[i][j]
            curves = avg.get((kind, step), {})
            for n_i, name in enumerate(names):
                if name not in curves:
                    continue
                c = curves[name]
                ws = sorted(c)
                ax.plot(ws, [c[w] for w in ws], marker=markers[n_i % len(markers)], ms=4,
                        lw=1.3, color=cmap(n_i % 10), label=name)
            med = median_curve(rows, kind, step)
            if med:
                ax.plot(list(med), list(med.values()), "k--", lw=2.2, label="median (all)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(widths)
            ax.set_xticklabels([str(w) for w in widths])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.grid(True, which="major", alpha=0.3)
            when = "init" if step == 0 else f"after {step} step{'s' if step > 1 else ''}"
            ax.set_title(f"{kind} — step {step} ({when})", fontsize=10)
            if j == 0:
                ax.set_ylabel(f"{kind} RMS")
            if i == len(kinds) - 1:
                ax.set_xlabel("width")
        axes[i][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8,
                           frameon=False)
    fig.suptitle(title or f"{par} coordinate check (layers averaged)", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def default_title(config: ml_collections.ConfigDict, steps: int) -> str:
    m, t = config.model, config.train
    return (f"{m.parametrization} coordinate check — depth {m.depth}, head dim "
            f"{head_dim_of(config)}, seq {m.seq_len}, batch {t.batch_size}, "
            f"η={config.optimizer.learning_rate:.4g} constant, {steps} AdamW steps "
            "(layers averaged; dashed: median over all tensors)")


def run(config: ml_collections.ConfigDict, widths: Sequence[int], steps: int, out,
        seed: Optional[int] = None, verbose: bool = True) -> list[dict]:
    """coord_check → ``out/coord_check.csv`` and ``out/coord_check.png``; prints the summary."""
    out = pathlib.Path(out)
    if verbose:
        print(f"coordinate check: {config.model.parametrization}, widths {list(widths)}, "
              f"{steps} steps", flush=True)
    rows = coord_check(config, widths, steps, seed=seed, verbose=verbose)
    write_csv(rows, out / "coord_check.csv")
    plot_grid(rows, out / "coord_check.png", title=default_title(config, steps))
    if verbose:
        print(summary(rows))
        print(f"wrote {out / 'coord_check.csv'} ({len(rows)} rows) and "
              f"{out / 'coord_check.png'}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# After training: RMS per tensor at the end of a full run, against width and against depth
# ---------------------------------------------------------------------------------------------


def model_config_at(config: ml_collections.ConfigDict, vocab_size: int, width: int,
                    depth: int) -> ModelConfig:
    """:func:`model_config_at_width` with the depth too (an integer ≥ 1)."""
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 1:
        raise ValueError(f"depth={depth!r} is invalid: it must be an integer >= 1")
    return model_config_at_width(config, vocab_size, width).replace(depth=int(depth))


def train_and_measure(config: ml_collections.ConfigDict, tokens: data_lib.TokenData,
                      mcfg: ModelConfig, probe: dict[str, np.ndarray], seed: int
                      ) -> tuple[dict[str, dict[str, float]], float]:
    """Trains ``mcfg`` for ``config.train.steps`` AdamW steps with the config's schedule on the
    config's pipeline; returns ({'weight': {name: rms}, 'activation': {name: rms}} at the end,
    the last step's loss).  Activations are those ``sow``-ed on the ``probe`` batch."""
    model = Decoder(mcfg)
    init = functools.partial(init_params, model)
    boxed = jax.eval_shape(init, jax.random.key(seed))
    tx = make_optimizer(train_lib.optimizer_config(config), boxed, mcfg.rule)
    params = jax.jit(lambda key: flax_meta.unbox(init(key)))(jax.random.key(seed))
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: model.apply(
            p, batch["inputs"], batch["targets"], method=Decoder.loss))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def measure(params, batch):
        _, mut = model.apply(params, batch["inputs"], batch["targets"], method=Decoder.loss,
                             mutable=["intermediates"])
        return {"weight": metrics_lib.tree_rms(params["params"], "x"),
                "activation": metrics_lib.tree_rms(mut["intermediates"], "x")}

    it = iter(data_lib.train_dataset(tokens.train, config.model.seq_len,
                                     config.train.batch_size, seed=config.data.shuffle_seed))
    loss = None
    for _ in range(config.train.steps):
        batch = {k: np.asarray(v) for k, v in next(it).items()}
        params, opt_state, loss = step(params, opt_state, batch)
    stats = jax.device_get(measure(params, probe))
    return ({kind: {n[len("x/"):]: float(v) for n, v in stats[kind].items()}
             for kind in AFTER_KINDS}, float(loss))


def after_training(config: ml_collections.ConfigDict, widths: Iterable[int],
                   depths: Iterable[int], seed: Optional[int] = None,
                   verbose: bool = False) -> list[dict]:
    """Rows ``{parametrization, axis, width, depth, steps, kind, name, rms,
    final_train_loss}``: the end-of-training RMS of every weight and activation tensor for the
    config's model at each of ``widths`` (at the config's depth; ``axis='width'``) and at each
    of ``depths`` (at the config's width; ``axis='depth'``).  A model on both axes (the
    config's own width and depth) is trained once and reported under each.  Every bad width or
    depth raises ``ValueError`` naming it before any data is loaded or anything compiles."""
    widths, depths = [int(w) for w in widths], [int(d) for d in depths]
    if not widths and not depths:
        raise ValueError("widths and depths are both empty: give one or more of either")
    train_lib.check_config(config)
    vocab = max(int(config.model.vocab_size or 0), 2)
    base_w, base_d = int(config.model.width), int(config.model.depth)
    points = [("width", w, base_d) for w in widths] + [("depth", base_w, d) for d in depths]
    for _, w, d in points:
        model_config_at(config, vocab, w, d)
    seed = config.seed if seed is None else seed
    tokens = data_lib.load_tokens(config.data, cache_dir=config.data.cache_dir or None)
    probe = fixed_batches(config, tokens, 1)[0]
    rows, trained = [], {}
    for axis, w, d in points:
        t0 = time.time()
        mcfg = model_config_at(config, tokens.vocab_size, w, d)
        if (w, d) not in trained:
            trained[w, d] = train_and_measure(config, tokens, mcfg, probe, seed)
        stats, loss = trained[w, d]
        for kind in AFTER_KINDS:
            for name, value in sorted(stats[kind].items()):
                rows.append({"parametrization": mcfg.parametrization, "axis": axis,
                             "width": w, "depth": d, "steps": int(config.train.steps),
                             "kind": kind, "name": name, "rms": value,
                             "final_train_loss": loss})
        if verbose:
            print(f"  {axis} point width {w:>4}, depth {d}: loss {loss:.4f} after "
                  f"{config.train.steps} steps, {time.time() - t0:.1f}s", flush=True)
    return rows


def write_after_csv(rows: Sequence[dict], path) -> pathlib.Path:
    return _write_rows(rows, path, AFTER_FIELDS)


def read_after_csv(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return [{**r, "width": int(r["width"]), "depth": int(r["depth"]),
                 "steps": int(r["steps"]), "rms": float(r["rms"]),
                 "final_train_loss": float(r["final_train_loss"])} for r in csv.DictReader(f)]


def after_curves(rows: Sequence[dict], axis: str, kind: str) -> dict[str, dict[int, float]]:
    """{name: {axis value: rms}} with ``layer_i/x`` merged into ``x`` (geometric mean over
    layers), plus ``'median (all)'``: the median over every tensor (every layer)."""
    acc: dict[str, dict[int, list[float]]] = {}
    med: dict[int, list[float]] = {}
    for r in rows:
        if r["axis"] != axis or r["kind"] != kind:
            continue
        x = r["width"] if axis == "width" else r["depth"]
        acc.setdefault(_LAYER.sub("", r["name"]), {}).setdefault(x, []).append(r["rms"])
        med.setdefault(x, []).append(r["rms"])
    out = {name: {x: float(np.exp(np.mean(np.log(np.maximum(v, 1e-30)))))
                  for x, v in sorted(by_x.items())} for name, by_x in sorted(acc.items())}
    if med:
        out["median (all)"] = {x: float(np.median(v)) for x, v in sorted(med.items())}
    return out


def after_summary(rows: Sequence[dict]) -> str:
    """Per kind and axis, the drift of each (layer-averaged) tensor's RMS over the axis,
    ``max/min``: the median of those ratios over tensors, and the largest one with its name.

    Ratios are taken per tensor, not of the median-over-tensors curve: along depth the set of
    tensors changes (more layers), which moves that median even when no tensor drifts."""
    if not rows:
        return "no rows"
    lines = [f"{rows[0]['parametrization']}: end-of-training RMS drift over the axis, max/min "
             "per tensor (median over tensors; worst tensor)"]
    for axis in ("width", "depth"):
        for kind in AFTER_KINDS:
            curves = after_curves(rows, axis, kind)
            curves.pop("median (all)", None)
            if not curves:
                continue
            ratios = {n: max(c.values()) / max(min(c.values()), 1e-30) for n, c in curves.items()}
            worst = max(ratios, key=ratios.get)
            xs = sorted({x for c in curves.values() for x in c})
            lines.append(f"  {kind:<10} vs {axis:<5} {xs}: median {np.median(list(ratios.values())):6.2f}x; "
                         f"worst {worst} {ratios[worst]:.2f}x")
    return "\n".join(lines)


def plot_after(rows: Sequence[dict], path, title: Optional[str] = None) -> pathlib.Path:
    """Rows: weights, activations; columns: against width, against depth (log2 x, log y); one
    line per tensor (layers averaged), the dashed median over every tensor."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes_present = [a for a in ("width", "depth") if any(r["axis"] == a for r in rows)]
    fig, axes = plt.subplots(len(AFTER_KINDS), len(axes_present),
                             figsize=(4.6 * len(axes_present) + 2.6, 3.4 * len(AFTER_KINDS)),
                             squeeze=False)
    cmap = plt.get_cmap("tab10")
    markers = "os^vD<>ph*"
    for i, kind in enumerate(AFTER_KINDS):
        for j, axis in enumerate(axes_present):
            ax = axes[i][j]
            curves = after_curves(rows, axis, kind)
            med = curves.pop("median (all)", {})
            for n_i, (name, c) in enumerate(curves.items()):
                ax.plot(list(c), list(c.values()), marker=markers[n_i % len(markers)], ms=4,
                        lw=1.3, color=cmap(n_i % 10), label=name)
            if med:
                ax.plot(list(med), list(med.values()), "k--", lw=2.2, label="median (all)")
            xs = sorted({r[axis] for r in rows if r["axis"] == axis})
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(xs)
            ax.set_xticklabels([str(x) for x in xs])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.grid(True, which="major", alpha=0.3)
            other = "depth" if axis == "width" else "width"
            fixed = next(r[other] for r in rows if r["axis"] == axis)
            ax.set_title(f"{kind} RMS after training vs {axis} ({other} {fixed})", fontsize=10)
            ax.set_xlabel(axis)
            if j == 0:
                ax.set_ylabel(f"{kind} RMS")
            ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7, frameon=False)
    par, steps = rows[0]["parametrization"], rows[0]["steps"]
    fig.suptitle(title or f"{par}: RMS per tensor at the end of {steps} training steps "
                 "(layers averaged; dashed: median over all tensors)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def run_after_training(config: ml_collections.ConfigDict, widths: Sequence[int],
                       depths: Sequence[int], out, seed: Optional[int] = None,
                       verbose: bool = True) -> list[dict]:
    """:func:`after_training` → ``out/coord_check_after_training.{csv,png}``; prints the
    summary."""
    out = pathlib.Path(out)
    m = config.model
    if verbose:
        print(f"end-of-training RMS: {m.parametrization}, widths {list(widths)} at depth "
              f"{m.depth}, depths {list(depths)} at width {m.width}, {config.train.steps} "
              "steps", flush=True)
    rows = after_training(config, widths, depths, seed=seed, verbose=verbose)
    write_after_csv(rows, out / "coord_check_after_training.csv")
    plot_after(rows, out / "coord_check_after_training.png")
    if verbose:
        print(after_summary(rows))
        print(f"wrote {out / 'coord_check_after_training.csv'} ({len(rows)} rows) and "
              f"{out / 'coord_check_after_training.png'}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The flags of ``python -m umup_jax.coord_check`` (defined only when it runs)."""
    cli.define_config_flag(FLAGS)
    flags.DEFINE_list("widths", ["64", "128", "256", "512"], "Comma-separated widths.")
    flags.DEFINE_integer("steps", 3, "AdamW steps k (rows at steps 0 … k); --after_training "
                         "trains for the config's train.steps instead.", lower_bound=0)
    flags.DEFINE_string("out", None, "Output directory: coord_check.csv, coord_check.png.")
    flags.DEFINE_integer("seed", None, "Init seed (default: the config's).")
    flags.DEFINE_bool("after_training", False,
                      "End-of-training RMS of every weight and activation against --widths (at "
                      "the config's depth) and --depths (at its width), each trained for the "
                      "config's train.steps with its schedule.")
    flags.DEFINE_list("depths", [], "With --after_training: comma-separated depths.")
    flags.mark_flags_as_required(["config", "out"])


def _integers(name: str, values: Sequence[str]) -> list[int]:
    try:
        return [int(v) for v in values if v.strip()]
    except ValueError:
        raise ValueError(f"--{name}={','.join(values)}: give comma-separated integers") from None


def main() -> None:
    """Bad input ends before any work (one line, exit status 2, :mod:`umup_jax.cli`); a
    failure while running ends with one ``python -m umup_jax.coord_check: error: …`` line
    and exit status 1, its traceback in ``OUT/error.log`` and library logging in
    ``OUT/run.log`` (:mod:`umup_jax.failures`)."""
    config = FLAGS.config
    with cli.usage_errors():
        widths = _integers("widths", FLAGS.widths)
        depths = _integers("depths", FLAGS.depths)
        if not widths:
            raise ValueError("--widths is empty: give one or more widths")
        if depths and not FLAGS.after_training:
            raise ValueError("--depths needs --after_training")
        train_lib.check_config(config)
        # Every width (and depth) is checked before anything runs.
        vocab = max(int(config.model.vocab_size or 0), 2)
        for w, d in [(w, config.model.depth) for w in widths] + [
                (config.model.width, d) for d in depths]:
            model_config_at(config, vocab, w, d)
    failures.log_to_workdir(FLAGS.out, logging.get_absl_logger().getEffectiveLevel())
    with failures.exit_on_failure(FLAGS.out):
        if FLAGS.after_training:
            run_after_training(config, widths, depths, FLAGS.out, seed=FLAGS.seed)
        else:
            run(config, widths, FLAGS.steps, FLAGS.out, seed=FLAGS.seed)


if __name__ == "__main__":
    define_flags()
    entry, parse = cli.app_main(main, FLAGS)
    app.run(entry, flags_parser=parse)
