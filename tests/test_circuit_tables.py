"""The tables built from graph records (lab.interp.graph_tables, Track E's seed and adapted frames) against
brute-force counts on hand-made records."""

from __future__ import annotations

import math

import polars as pl
import pytest

from lab.interp import circuits as C
from lab.interp import graph_tables as GT
from lab.tracks.E_circuits import frames as F


def rec(prompt_id, ctype, word, checkpoint, keys, tokens=(1, 2, 3), **extra):
    return {
        "prompt_id": prompt_id,
        "constraint_type": ctype,
        "word": word,
        "checkpoint": checkpoint,
        "fraction": checkpoint / 4,
        "input_tokens": list(tokens),
        "features": [{"key": k} for k in keys],
        "edges": [],
        **extra,
    }


def test_feature_sets_drop_positions():
    r = rec("a", "mapping", "blarf", 0, ["F1.3.7", "F1.5.7", "F2.3.9"])
    assert C.feature_set(r) == {(1, 7), (2, 9)}
    other = rec("a", "mapping", "blarf", 1, ["F1.4.7", "F2.3.9", "F3.1.1"])
    got = C.compare(r, other)
    assert got["feature_jaccard"] == pytest.approx(1 / 5)  # F2.3.9 of 5 keys
    assert got["feature_set_jaccard"] == pytest.approx(2 / 3)  # (1,7), (2,9) of (1,7), (2,9), (3,1)


def test_paraphrase_overlap_pairs_the_first_two_prompts_of_each_word_on_the_base_model():
    records = [
        rec("m-blarf-0", "mapping", "blarf", 0, ["F1.1.1", "F2.1.2"], tokens=(1, 2)),
        rec("m-blarf-1", "mapping", "blarf", 0, ["F1.4.1", "F3.1.3"], tokens=(5, 6, 7)),
        rec("m-blarf-1", "mapping", "blarf", 1, ["F9.1.9"], tokens=(5, 6, 7)),  # not the base model
        rec("s-florp-0", "spatial", "florp", 0, ["F1.1.1"]),  # alone: no pair
        rec("seed-0", "seed", "", 0, ["F1.1.1"]),
    ]
    got = GT.paraphrase_overlap(records)
    assert got.height == 1 and got["word"][0] == "blarf"
    assert got["feature_set_jaccard"][0] == pytest.approx(1 / 3)  # (1,1) shared of (1,1), (2,2), (3,3)
    assert F.circuit_threshold(got, None) == pytest.approx(1 / 3)
    assert F.circuit_threshold(got, 0.7) == 0.7


def test_accounting_shares_add_up_to_one():
    parts = {"selected_features": 3.0, "unselected_features": 0.5, "errors": 1.5, "tokens": -0.25, "b_dec": 0.5}
    parts |= {"bos_mlp": -0.25, "residual": 0.0}
    r = rec("a", "mapping", "blarf", 2, []) | {"accounting": {"demeaned_logit": 5.0, **parts}}
    row = GT.accounting_frame([r]).row(0, named=True)
    assert sum(row[f"{p}_share"] for p in GT.ACCOUNT_PARTS) == pytest.approx(1.0)
    assert row["errors_share"] == pytest.approx(0.3) and row["demeaned_logit"] == 5.0


def test_intervention_fit_is_pearson_per_checkpoint():
    checks = [
        {"predicted": p, "measured": m, "measured_direct": p, "scale": 0.0}
        for p, m in ((1.0, 2.0), (2.0, 3.0), (3.0, 5.0), (-1.0, 1.0))
    ]
    records = [rec("a", "seed", "", 1, []) | {"interventions": checks}, rec("b", "seed", "", 2, [])]
    frame = GT.interventions_frame(records)
    assert frame.height == 4  # record b has no checks
    fit = GT.intervention_fit(frame).row(0, named=True)
    x, y = [c["predicted"] for c in checks], [c["measured"] for c in checks]
    mx, my = sum(x) / 4, sum(y) / 4
    r = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True)) / math.sqrt(
        sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y)
    )
    assert fit["r_whole"] == pytest.approx(r) and fit["r_frozen"] == pytest.approx(1.0)
    assert fit["same_sign_whole"] == 0.75 and fit["n"] == 4


def _checkpoints(losses, accs, ctype="mapping"):
    return pl.DataFrame(
        [
            {"checkpoint": i, "constraint_type": c, "fraction": i / 4, "step": 10 * i, "val_loss": lo, "accuracy": a}
            | {"mean_margin": 0.0}
            for c in ("mapping", "spatial")
            for i, (lo, a) in enumerate(zip(losses, accs, strict=True))
        ]
    )


def test_seed_stopping_applies_both_rules_per_seed_on_common_prompts():
    same = ["F1.1.1", "F2.1.2"]
    runs = {}
    for seed, late in ((0, ["F5.1.5"]), (1, same)):
        recs = []
        for ctype in ("mapping", "spatial"):
            for ck in range(5):  # seed 0 changes at every checkpoint; seed 1 never after the first
                keys = same if (seed == 1 and ck >= 1) else [f"F{ck}.1.{ck}"] + (late if ck == 4 else [])
                recs.append(rec(f"{ctype}-w-0", ctype, "w", ck, keys))
        if seed == 0:
            recs.append(rec("mapping-w-1", "mapping", "w", 0, same))  # only seed 0 has it: left out
        runs[seed] = (_checkpoints([5, 2, 1, 1.5, 1.8], [0.25, 0.5, 1, 1, 1]), recs)
    got = F.seed_stopping(runs, threshold=0.9)
    circuit = {
        (r["seed"], r["constraint_type"]): r["kept_checkpoint"]
        for r in got.iter_rows(named=True)
        if r["rule"] == "circuit"
    }
    assert circuit == {(0, "mapping"): 4, (0, "spatial"): 4, (1, "mapping"): 2, (1, "spatial"): 2}
    loss = got.filter((pl.col("rule") == "loss") & (pl.col("seed") == 1))
    assert loss["kept_checkpoint"].to_list() == [2, 2] and loss["steps_trained"].to_list() == [30, 30]


def test_accounting_means_average_each_groups_shares():
    def graph(ck, errors, residual):
        parts = {"selected_features": 1.0, "unselected_features": 0.0, "errors": errors, "tokens": 0.0}
        parts |= {"b_dec": 0.0, "bos_mlp": 0.0, "residual": residual}
        total = sum(parts.values())
        return rec("a", "mapping", "w", ck, []) | {"accounting": {"demeaned_logit": total, **parts}}

    means = GT.accounting_means(GT.accounting_frame([graph(0, 1.0, 0.0), graph(0, 3.0, -1e-6), graph(1, 0.0, 0.0)]))
    first = means.row(0, named=True)
    assert first["graphs"] == 2 and first["errors_share"] == pytest.approx((1 / 2 + 3 / 4) / 2, rel=1e-5)
    assert first["residual_max"] == pytest.approx(1e-6) and means["checkpoint"].to_list() == [0, 1]


def test_adapted_frame_counts_new_features_against_the_base_models_graph():
    def graph(ck, keys, error_share, errors=1.0):
        acc = {"demeaned_logit": 4.0, "errors": errors}
        return rec("m-0", "mapping", "w", ck, keys) | {"error_share": error_share, "accounting": acc}

    records = [graph(0, ["F1.1.1", "F2.1.2"], 0.2), graph(4, ["F1.1.1", "F3.1.3", "F4.1.4"], 0.5, errors=2.0)]
    adapted = [graph(4, ["F1.1.1", "F3.1.3", "F5.1.5", "F6.1.6"], 0.3)]
    row = F.adapted_frame(records, adapted).row(0, named=True)
    assert (row["error_share_base_tc"], row["error_share_adapted_tc"]) == (0.5, 0.3)
    assert (row["errors_base_tc"], row["errors_adapted_tc"]) == (0.5, 0.25)
    assert row["feature_jaccard"] == pytest.approx(2 / 5)  # F1.1.1, F3.1.3 of five keys
    assert row["new_share_base_tc"] == pytest.approx(2 / 3) and row["new_share_adapted_tc"] == pytest.approx(3 / 4)
