"""Sweep analysis (umup_jax/analysis.py): Algorithm 1 on hand-made tables with hand-computed
answers, per-group optima, loss tables, CSV round trip, and that every plot writes a PNG."""

import math

import numpy as np
import pytest

from umup_jax import analysis as an

INF, NAN = math.inf, math.nan
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# transfer_error


def test_perfect_transfer_is_zero():
    # Every row's optimum is t index 1; the global min 1.5 is at (f=2, t=1).  Each f ≠ f* has
    # t_f = 1 = t*, so every excess L(f*, t_f) − L(f*, t*) is 0.
    table = [[3.0, 2.0, 2.5],
             [2.8, 1.8, 2.3],
             [2.6, 1.5, 2.1]]
    te = an.transfer_error(table, [256, 512, 1024], [0.5, 1.0, 2.0])
    assert te.err == 0.0
    assert (te.f_star, te.t_star) == (1024, 1.0)
    assert te.t_opt == [1.0, 1.0, 1.0]
    assert te.on_edge == [False, False, False] and not te.any_on_edge
    assert te.excess == [0.0, 0.0, 0.0]
    assert te.n_used == 2


SHIFT_F = [256, 512, 1024]
SHIFT_T = [2**-3, 2**-2, 2**-1, 2**0]
SHIFT = [[3.0, 2.9, 3.1, 3.5],   # f=256:  t_f = index 1 (2.9)
         [2.9, 2.7, 2.6, 2.8],   # f=512:  t_f = index 2 (2.6)
         [2.8, 2.6, 2.4, 2.3]]   # f=1024: t_f = index 3 (2.3) = global min → (f*, t*)


def test_shifting_optimum_exact_value_and_edge_flag():
    # f* = 1024, t* = 2^0, L* = 2.3.
    # f=256: t_f = 2^-2 → L(1024, 2^-2) = 2.6 → excess 0.3
    # f=512: t_f = 2^-1 → L(1024, 2^-1) = 2.4 → excess 0.1
    # err = (0.3 + 0.1) / (3 − 1) = 0.2.  t* is the last grid value → on_edge for f=1024.
    te = an.transfer_error(SHIFT, SHIFT_F, SHIFT_T)
    assert te.err == pytest.approx(0.2)
    assert (te.f_star, te.t_star, te.f_star_index, te.t_star_index) == (1024, 1.0, 2, 3)
    assert te.t_opt == [2**-2, 2**-1, 2**0]
    assert te.t_opt_index == [1, 2, 3]
    assert te.excess == pytest.approx([0.3, 0.1, 0.0])
    assert te.on_edge == [False, False, True] and te.any_on_edge


def test_reference_override():
    # f* forced to 512: t* = argmin row 512 = index 2, L* = 2.6.
    # f=256: t_f = index 1 → L(512, ·) = 2.7 → 0.1;  f=1024: t_f = index 3 → 2.8 → 0.2.
    # err = (0.1 + 0.2) / 2 = 0.15.
    te = an.transfer_error(SHIFT, SHIFT_F, SHIFT_T, reference=512)
    assert te.err == pytest.approx(0.15)
    assert (te.f_star, te.t_star) == (512, 2**-1)
    # The reference equal to the global argmin row gives the default answer.
    assert an.transfer_error(SHIFT, SHIFT_F, SHIFT_T, reference=1024).err == pytest.approx(0.2)
    with pytest.raises(ValueError, match="reference"):
        an.transfer_error(SHIFT, SHIFT_F, SHIFT_T, reference=2048)


def test_ties_take_first_index():
    # Global min 1.0 occurs at (0,1), (0,2), (1,0), (1,2); row-major first → f* = 0, t* = 1.
    # Row 1 ties between t=0 and t=2 → t_f = 0 → L(0, 0) = 2.0 → excess 1.0 → err = 1.0.
    # (Last-index tie-breaking would give f* = 1, t* = 2, row 0's t_f = 2 → err 0.)
    table = [[2.0, 1.0, 1.0],
             [1.0, 3.0, 1.0]]
    te = an.transfer_error(table)
    assert (te.f_star_index, te.t_star_index) == (0, 1)
    assert te.t_opt_index == [1, 0]
    assert te.err == 1.0
    assert te.on_edge == [False, True]
    assert (te.f_star, te.t_star) == (0, 1)  # default grids are the indices


def test_all_diverged_row_is_skipped_and_flagged():
    # Row 0 all diverged: skipped.  Global min 1.1 at (3, 2).
    # f=1: t_f = 1 → L(3, 1) = 1.4 → 0.3;  f=2: t_f = 1 → 1.4 → 0.3.
    # err = 0.6 / 2 (the rows that contributed), not / 3.
    table = [[NAN, INF, NAN],
             [2.0, 1.5, 1.8],
             [1.9, 1.2, 1.6],
             [1.7, 1.4, 1.1]]
    te = an.transfer_error(table)
    assert te.skipped == [True, False, False, False]
    assert te.t_opt[0] is None and te.t_opt_index[0] is None
    assert te.on_edge == [False, False, False, True]
    assert math.isnan(te.excess[0])
    assert te.n_used == 2
    assert te.err == pytest.approx(0.3)


def test_nan_counts_as_diverged_not_as_minimum():
    # np.argmin would pick the NaN of row 0; as +inf it loses: t_f(row 0) = 0 (1.0).
    # Global min 0.5 at (1, 1).  f=0: L(1, 0) = 2.0 → excess 1.5 → err 1.5.
    table = np.array([[1.0, NAN, 3.0],
                      [2.0, 0.5, INF]])
    te = an.transfer_error(table)
    assert te.t_opt_index == [0, 1]
    assert (te.f_star_index, te.t_star_index) == (1, 1)
    assert te.err == pytest.approx(1.5)
    # The caller's array is not modified.
    assert np.isnan(table[0, 1])


def test_transferred_optimum_that_diverges_at_f_star_gives_inf():
    # f* = 1 (0.5 at t=1); row 0's t_f = 0, and L(1, 0) diverged → excess +inf.
    te = an.transfer_error([[1.0, 2.0], [INF, 0.5]])
    assert te.err == INF


def test_undefined_cases_are_nan():
    single = an.transfer_error([[1.0, 0.5, 2.0]])        # n = 1: no f ≠ f*
    assert math.isnan(single.err) and single.t_opt_index == [1]
    dead = an.transfer_error([[NAN, INF], [INF, NAN]])   # nothing finite
    assert math.isnan(dead.err) and dead.f_star is None and dead.t_star is None
    assert dead.skipped == [True, True]
    # reference row all diverged: t* undefined.
    ref_dead = an.transfer_error([[1.0, 2.0], [INF, INF]], [1, 2], reference=2)
    assert math.isnan(ref_dead.err) and ref_dead.f_star == 2 and ref_dead.t_star is None


@pytest.mark.parametrize("losses, fixed, transfer", [
    ([1.0, 2.0, 3.0], None, None),                      # 1-D
    (np.zeros((2, 2, 2)), None, None),                  # 3-D
    (np.zeros((0, 3)), None, None),                     # empty
    ([[1.0, 2.0], [3.0]], None, None),                  # ragged
    ([["a", "b"], ["c", "d"]], None, None),             # not numeric
    ([[1.0, 2.0], [3.0, 4.0]], [1, 2, 3], None),        # len(fixed) ≠ n
    ([[1.0, 2.0], [3.0, 4.0]], [1, 2], [0.1]),          # len(transfer) ≠ m
])
def test_bad_shapes_raise(losses, fixed, transfer):
    with pytest.raises(ValueError):
        an.transfer_error(losses, fixed, transfer)


# ---------------------------------------------------------------------------------------------
# Rows: read_results, loss_table, optimum_per_group, write_csv


def _row(p, width, lr, loss, diverged=False, seed=0, **hps):
    row = {"run_id": f"{p}-{width}-{lr}-{seed}", "sweep": "lr", "group": p,
           "parametrization": p, "width": width, "depth": 4, "steps": 100, "batch_size": 8,
           "seq_len": 64, "lr": lr, "seed": seed, "final_train_loss": loss,
           "final_eval_loss": NAN if diverged else loss, "diverged": diverged,
           "wall_time_s": 1.0}
    row.update({f"hp.{k}": v for k, v in hps.items()})
    return row


CSV_TEXT = (
    "run_id,sweep,group,parametrization,width,depth,steps,batch_size,seq_len,lr,hp.attn_mult,"
    "seed,final_train_loss,final_eval_loss,diverged,wall_time_s,overrides,error\n"
    'a,lr,g,umup,256,4,100,8,64,0.5,1.0,0,3.5,3.25,0,12.5,"{""lr"": 0.5}",\n'
    "b,lr,g,umup,256,4,100,8,64,8.0,1.0,0,nan,,1,3.0,,\n"
    "c,lr,g,sp,512,4,100,8,64,0.0009765625,,1,inf,inf,1,4,,ValueError: 1.5\n"
)


def test_read_results_parses_types(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text(CSV_TEXT)
    rows = an.read_results(path)
    assert len(rows) == 3
    a, b, c = rows
    assert a["run_id"] == "a" and a["parametrization"] == "umup"
    assert isinstance(a["width"], int) and a["width"] == 256 and isinstance(a["seed"], int)
    assert a["lr"] == 0.5 and a["hp.attn_mult"] == 1.0 and a["final_eval_loss"] == 3.25
    assert a["diverged"] is False and b["diverged"] is True
    assert math.isnan(b["final_train_loss"]) and math.isnan(b["final_eval_loss"])
    assert c["final_eval_loss"] == INF and c["lr"] == 2**-10 and math.isnan(c["hp.attn_mult"])
    assert a["overrides"] == '{"lr": 0.5}' and b["overrides"] == ""
    assert a["error"] == "" and c["error"] == "ValueError: 1.5"  # text, never a number
    assert [an.run_loss(r) for r in rows] == [3.25, INF, INF]


def test_write_csv_round_trip(tmp_path):
    rows = [_row("umup", 256, 0.5, 3.25), _row("umup", 256, 8.0, 0.0, diverged=True)]
    path = an.write_csv(rows, tmp_path / "sub" / "t.csv")
    back = an.read_results(path)
    assert back[0]["lr"] == 0.5 and back[0]["final_eval_loss"] == 3.25
    assert back[1]["diverged"] is True and math.isnan(back[1]["final_eval_loss"])
    assert list(back[0]) == list(rows[0])


def test_loss_table_sorts_fills_and_aggregates():
    rows = [
        _row("umup", 512, 2.0, 3.0),
        _row("umup", 256, 1.0, 3.4, seed=0),
        _row("umup", 256, 1.0, 3.6, seed=1),              # seeds averaged → 3.5
        _row("umup", 256, 2.0, 3.3),
        _row("umup", 256, 4.0, 3.8, seed=0),
        _row("umup", 256, 4.0, 0.0, seed=1, diverged=True),  # one seed diverged → inf
        _row("sp", 256, 1.0, 9.9),                         # filtered out below
    ]
    fixed, transfer, table = an.loss_table(rows, "width", "lr", where={"parametrization": "umup"})
    assert fixed == [256, 512] and transfer == [1.0, 2.0, 4.0]
    np.testing.assert_allclose(table[0], [3.5, 3.3, INF])
    assert math.isnan(table[1, 0]) and table[1, 1] == 3.0 and math.isnan(table[1, 2])
    # Predicate filters work too; without a filter the two parametrizations clash.
    _, _, t2 = an.loss_table(rows, "width", "lr", where=lambda r: r["parametrization"] == "sp")
    assert t2.tolist() == [[9.9]]
    with pytest.raises(ValueError, match="parametrization"):
        an.loss_table(rows, "width", "lr")


def test_loss_table_hp_names_and_mixed_configs():
    rows = [_row("umup", 256, 1.0, 3.0 + a + r, attn_mult=a, residual_mult=r)
            for a in (0.5, 1.0, 2.0) for r in (0.5, 1.0)]
    fixed, transfer, table = an.loss_table(rows, "attn_mult", "hp.residual_mult")
    assert fixed == [0.5, 1.0, 2.0] and transfer == [0.5, 1.0]
    np.testing.assert_allclose(table, [[4.0, 4.5], [4.5, 5.0], [5.5, 6.0]])
    # Collapsing over residual_mult would average different configurations: refused.
    with pytest.raises(ValueError, match="hp.residual_mult"):
        an.loss_table(rows, "attn_mult", "lr")
    with pytest.raises(KeyError):
        an.loss_table(rows, "nope", "lr")
    wd = [dict(_row("umup", 256, 1.0, 3.0), weight_decay=w) for w in (0.0, 1e-4)]
    with pytest.raises(ValueError, match="weight_decay"):
        an.loss_table(wd, "width", "lr")


def test_optimum_per_group_with_edge_flag():
    lrs = [2**-2, 2**-1, 2**0, 2**1]
    rows = (
        # umup 256: optimum 2^-1, interior.
        [_row("umup", 256, lr, y) for lr, y in zip(lrs, [3.4, 3.1, 3.2, 3.6])]
        # umup 512: optimum at the largest lr → on the edge; smallest lr diverged.
        + [_row("umup", 512, lr, y, diverged=(lr == 2**-2)) for lr, y in
           zip(lrs, [0.0, 3.0, 2.9, 2.8])]
        # sp 256: everything diverged.
        + [_row("sp", 256, lr, 0.0, diverged=True) for lr in lrs[:2]]
    )
    out = an.optimum_per_group(rows, ["parametrization", "width"])
    assert [(o["parametrization"], o["width"]) for o in out] == [
        ("sp", 256), ("umup", 256), ("umup", 512)]
    sp, u256, u512 = out
    assert u256["best_x"] == 0.5 and u256["best_loss"] == 3.1 and u256["log2_x"] == -1.0
    assert u256["on_edge"] is False and u256["n_x"] == 4 and u256["n_diverged"] == 0
    assert u512["best_x"] == 2.0 and u512["log2_x"] == 1.0 and u512["on_edge"] is True
    assert u512["n_diverged"] == 1 and (u512["x_min"], u512["x_max"]) == (0.25, 2.0)
    assert math.isnan(sp["best_x"]) and sp["best_loss"] == INF and sp["on_edge"] is False
    assert sp["n_diverged"] == 2


# ---------------------------------------------------------------------------------------------
# Interdependence matrix


def _pair_rows():
    """Three HPs a, b, c on log2 grids {-1, 0, 1}; each pair swept as a full 2-D grid with the
    third at its default 1.  Loss = 0.1·la² + (lb − la)² + lc² (l = log2): b's optimum follows
    a; c is independent of both."""
    grid = (0.5, 1.0, 2.0)
    rows = []
    for x in grid:
        for y in grid:
            for a, b, c in ((x, y, 1.0), (x, 1.0, y), (1.0, x, y)):
                la, lb, lc = math.log2(a), math.log2(b), math.log2(c)
                rows.append(_row("umup", 256, 1.0, 3.0 + 0.1 * la**2 + (lb - la)**2 + lc**2,
                                 a=a, b=b, c=c))
    return rows


def test_interdependence_errors_known_values():
    # (a fixed, b transferred), c = 1: L = 0.1·la² + (lb − la)²; global min (0, 0).
    #   la = ±1 → t_f = lb = ±1 → L(0, ±1) = 1 → err = (1 + 1)/2 = 1.
    # (b fixed, a transferred): lb = ±1 → argmin_la (0.1·la² + (lb − la)²) = ±1 (0.1 < 1)
    #   → L(lb=0, la=±1) = 0.1 + 1 = 1.1 → err = 1.1.
    # Pairs with c are separable → 0.  Diagonal NaN.
    m = an.interdependence_errors(_pair_rows(), ["a", "b", "c"])
    expected = np.array([[NAN, 1.0, 0.0], [1.1, NAN, 0.0], [0.0, 0.0, NAN]])
    np.testing.assert_allclose(m, expected, atol=1e-12)


def test_interdependence_errors_incomplete_grid_is_nan():
    rows = [r for r in _pair_rows() if not (r["hp.a"] == 2.0 and r["hp.b"] == 2.0)]
    m = an.interdependence_errors(rows, ["a", "b", "c"])
    assert math.isnan(m[0, 1]) and math.isnan(m[1, 0]) and m[0, 2] == 0.0
    # allow_missing: the missing cell (la, lb) = (1, 1) counts as diverged.  a fixed: la = −1 →
    # t_f = −1 → L(0, −1) = 1; la = 1 → row [4.1, 1.1, inf] → t_f = 0 → excess 0 → err 0.5.
    # c is not in hps here, so it is pinned with where=; without it runs at c ≠ 1 would clash.
    m2 = an.interdependence_errors(rows, ["a", "b"], where={"c": 1.0}, allow_missing=True)
    assert m2[0, 1] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="hp.c"):
        an.interdependence_errors(rows, ["a", "b"], allow_missing=True)


# ---------------------------------------------------------------------------------------------
# Plots


def _lr_sweep_rows():
    rows = []
    centres = {"sp": {256: -8, 512: -9, 1024: -10}, "mup": {256: -7, 512: -7, 1024: -6},
               "umup": {256: 1, 512: 1, 1024: 1}}
    for p, by_width in centres.items():
        lo = -12 if p == "sp" else (-10 if p == "mup" else -2)
        for width, c in by_width.items():
            base = 4.0 - 0.25 * math.log2(width / 256)
            for k in range(lo, lo + 8):
                loss = base + 0.05 * (k - c) ** 2
                rows.append(_row(p, width, 2.0**k, loss, diverged=(k - c >= 4)))
    return rows


def _is_png(path):
    return path.exists() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_plot_loss_vs_lr_writes_png(tmp_path):
    out = tmp_path / "fig1b.png"
    errors = an.plot_loss_vs_lr(_lr_sweep_rows(), out, title="synthetic Fig. 1b")
    assert _is_png(out)
    assert list(errors) == ["sp", "mup", "umup"]
    assert errors["umup"].err == 0.0 and errors["sp"].err > 0.0
    largest = an.plot_loss_vs_lr(_lr_sweep_rows(), tmp_path / "ref.png", reference="largest")
    assert largest["sp"].f_star == 1024


def test_plot_interdependence_and_transfer_heatmap_write_png(tmp_path):
    rows = _pair_rows()
    out = tmp_path / "ab.png"
    te = an.plot_interdependence(rows, "a", "b", out, where={"hp.c": 1.0})
    assert _is_png(out) and te.err == pytest.approx(1.0)
    names = ["a", "b", "c"]
    out2 = an.plot_transfer_heatmap(an.interdependence_errors(rows, names), names,
                                    tmp_path / "heat.png")
    assert _is_png(out2)
    with pytest.raises(ValueError):
        an.plot_transfer_heatmap(np.zeros((2, 3)), names, tmp_path / "bad.png")


def test_a_run_flagged_diverged_is_inf_whatever_its_loss():
    """Spec §0.1 "NaN/inf = diverged": a run with ``diverged`` set has loss +inf even when a
    finite loss was recorded, so it is never the optimum nor averaged into a cell."""
    assert an.run_loss({"diverged": True, "final_eval_loss": 3.0}) == math.inf
    assert an.run_loss({"diverged": "1", "final_eval_loss": 3.0}) == math.inf
    assert an.run_loss({"diverged": False, "final_eval_loss": 3.0}) == 3.0
    rows = [{"width": 64, "lr": lr, "final_eval_loss": loss, "diverged": div}
            for lr, loss, div in ((0.5, 3.5, False), (1.0, 3.0, True), (2.0, 3.2, False))]
    [opt] = an.optimum_per_group(rows, ["width"])
    assert opt["best_x"] == 2.0 and opt["best_loss"] == 3.2 and opt["n_diverged"] == 1
