"""lab.interp.circuits on a tiny Llama with tiny trained transcoders: the attribution split against the model's own
logits, graph comparison identities, the statistics, and Track E's stopping rules / graph prompts."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from lab.data.constraints import CONSTRAINTS, graph_prompts
from lab.data.corpus import smoke_corpus
from lab.interp import circuits as C
from lab.interp import transcoders as T
from lab.models.loading import load_tiny_model
from lab.profiles import get_profile
from lab.tracks.E_circuits import frames as F
from lab.tracks.E_circuits import run as E
from lab.tracks.E_circuits.config import RECIPES, SEED_PROMPTS

PROMPT = "The king speaks of the"


@pytest.fixture(scope="module")
def lm():
    return load_tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def tc_folder(lm, tmp_path_factory):
    """Tiny transcoders trained on the tiny Llama (the smoke recipe)."""
    folder = tmp_path_factory.mktemp("tc") / "tc"
    T.build(RECIPES["smoke"].transcoders, lm, folder, corpus=smoke_corpus(), progress=False)
    return folder


@pytest.fixture(scope="module")
def traced(lm, tc_folder, tmp_path_factory):
    """Graphs of PROMPT followed at ' moon' (the completeness identity is tests/test_graph_checks.py's)."""
    root = tmp_path_factory.mktemp("circ")
    tcs, _ = T.load_transcoders(tc_folder)
    folder = C.export_model(lm.model, lm.tokenizer, root / "model")
    assert sorted(p.name for p in root.iterdir()) == ["model"]  # published whole, no temp sibling left
    rm = C.replacement_model(folder, tcs)
    target = lm.tokenizer(" moon", add_special_tokens=False)["input_ids"][0]
    rec, graph = C.trace(rm, PROMPT, target_id=target, max_feature_nodes=100)
    rec2, _ = C.trace(rm, PROMPT, target_id=target, max_feature_nodes=100)
    return rec, rec2, graph, target, lm.model


def test_the_record_follows_the_target_with_the_models_probability(lm, traced):
    rec, _, _, target, model = traced
    ids = torch.tensor([rec["input_tokens"]])
    assert rec["input_tokens"][0] == lm.tokenizer.bos_token_id  # circuit-tracer prepended the BOS
    assert rec["n_selected_features"] > 0 and rec["target_from_errors"] != 0
    with torch.no_grad():
        logits = model(ids).logits[0, -1].double()
    assert rec["target_id"] == target
    assert rec["target_prob"] == pytest.approx(float(logits.softmax(-1)[target]), rel=1e-4)


def test_record_is_consistent_with_the_graph(traced):
    rec, _, graph, _, _ = traced
    assert rec["n_selected_features"] == len(graph.selected_features) <= 100
    assert 0 <= rec["error_share"] <= 1 and 0 <= rec["feature_share"] <= 1
    assert rec["error_share"] + rec["feature_share"] <= 1 + 1e-9  # the rest is the token embeddings
    kept = {f["key"] for f in rec["features"]}
    assert len(kept) == rec["n_kept_features"]
    for s, t, w in rec["edges"]:
        assert w != 0 and s != t
        for key in (s, t):
            assert key[0] in "FETL"
    assert all(f["key"].startswith("F") for f in rec["features"])


def test_compare_identities(traced):
    rec, rec2, _, _, _ = traced
    same = C.compare(rec, rec2)  # attribution is deterministic: the same graph twice
    assert same["feature_jaccard"] == 1.0 and same["edge_correlation"] == pytest.approx(1.0)
    assert C.jaccard({1, 2}, {3}) == 0.0 and C.jaccard({1, 2}, {2, 3}) == pytest.approx(1 / 3)
    a = [("x", "y", 1.0), ("y", "z", 2.0), ("x", "z", 3.0)]
    b = [("x", "y", 1.0), ("y", "z", 2.0), ("z", "w", 5.0)]
    # union of 4 edges, absent = 0: a = (1, 2, 3, 0), b = (1, 2, 0, 5) in sorted-key order
    xa = np.array([1.0, 3.0, 2.0, 0.0])  # sorted keys (x,y) (x,z) (y,z) (z,w)
    xb = np.array([1.0, 0.0, 2.0, 5.0])
    assert C.edge_correlation(a, b) == pytest.approx(float(np.corrcoef(xa, xb)[0, 1]))
    assert math.isnan(C.edge_correlation(a[:1], b[:1]))
    other = dict(rec, input_tokens=rec["input_tokens"][:-1])
    with pytest.raises(Exception, match="same prompt"):
        C.compare(rec, other)


def test_trace_prompts_writes_each_missing_record_once(lm, tc_folder, tmp_path):
    """Each record is trace()'s plus its timing and decoded tokens; graph JSON only for the chosen ids; a second
    call traces only what is missing and loads no model when nothing is."""
    tcs, _ = T.load_transcoders(tc_folder)
    moon = lm.tokenizer(" moon", add_special_tokens=False)["input_ids"][0]
    prompts = [
        {"prompt_id": "a", "text": PROMPT, "target_id": moon},
        {"prompt_id": "b", "text": "The queen", "target_id": None},
    ]
    loads, ticks = [], []

    def load():
        loads.append(1)
        return lm.model, lm.tokenizer

    out, model_dir = tmp_path / "out", tmp_path / "model"
    kw = dict(
        max_feature_nodes=100, json_for={"a"}, json_suffix="-x", on_traced=lambda: ticks.append(1), check_for={"a"}
    )
    assert C.trace_prompts(load, tcs, prompts, out, model_dir, **kw) == 2 and len(loads) == 1 and len(ticks) == 2
    replacement = C.replacement_model(model_dir, tcs)
    for pr in prompts:
        rec = C.read_record(out, pr["prompt_id"])
        direct, _ = C.trace(replacement, pr["text"], target_id=pr["target_id"], max_feature_nodes=100)
        assert rec.pop("attribution_s") > 0 and rec.pop("checks_s") > 0
        accounting = rec.pop("accounting")  # every graph's, adding up (tests/test_graph_checks.py has the identity)
        assert accounting["selected_features"] == pytest.approx(direct["target_from_features"], abs=1e-5)
        assert abs(accounting["residual"]) < 1e-4
        checks = rec.pop("interventions", [])  # only where asked: the 8 strongest features at scales 0 and 2
        assert [r["scale"] for r in checks] == ([0.0] * 8 + [2.0] * 8 if pr["prompt_id"] == "a" else [])
        assert rec.pop("tokens") == [lm.tokenizer.decode([t]) for t in direct["input_tokens"]]
        assert rec == json.loads(json.dumps(direct))  # the same graph, as JSON
    assert sorted(f.name for f in (out / "json").iterdir()) == ["a-x.json", "graph-metadata.json"]  # + its index
    (out / "b.json").unlink()  # as if interrupted before the last prompt
    assert C.trace_prompts(load, tcs, prompts, out, model_dir, **kw) == 1 and len(loads) == 2
    assert C.trace_prompts(load, tcs, prompts, out, model_dir, **kw) == 0 and len(loads) == 2


def test_sign_flip_test_exact_values():
    assert C.sign_flip_test([1.0, 1.0, 1.0]) == pytest.approx(2 / 8)  # only all + or all - reach |mean| = 1
    assert C.sign_flip_test([0.0, 0.0]) == 1.0
    assert C.sign_flip_test([1.0, -1.0, 2.0, -2.0]) == 1.0  # mean 0 is as extreme as anything
    assert math.isnan(C.sign_flip_test([]))


def test_bootstrap_mean():
    m, lo, hi = C.bootstrap_mean([2.0] * 5)
    assert m == lo == hi == 2.0
    m, lo, hi = C.bootstrap_mean([0.0, 1.0, float("nan"), 2.0])
    assert m == 1.0 and 0.0 <= lo < 1.0 < hi <= 2.0
    assert all(math.isnan(x) for x in C.bootstrap_mean([]))


def _frame(loss_m, loss_s, acc_m, acc_s):
    rows = []
    for ctype, loss, acc in (("mapping", loss_m, acc_m), ("spatial", loss_s, acc_s)):
        for i, (lo, ac) in enumerate(zip(loss, acc, strict=True)):
            rows.append(
                {
                    "constraint_type": ctype,
                    "checkpoint": i,
                    "step": 10 * i,
                    "fraction": i / 4,
                    "accuracy": ac,
                    "val_loss": lo,
                    "mean_margin": 0.0,
                }
            )
    return pl.DataFrame(rows)


def test_stopping_rules():
    frame = _frame([5, 2, 1, 1.5, 1.8], [5, 4, 3, 2, 1], [0.25, 0.5, 1, 1, 1], [0.2, 0.2, 0.4, 0.95, 1])
    cmp = pl.DataFrame(
        [
            {"constraint_type": c, "checkpoint": i, "versus": "previous", "feature_set_jaccard": j}
            for c, js in (("mapping", [0.1, 0.3, 0.6, 0.7]), ("spatial", [0.1, 0.2, 0.3, 0.4]))
            for i, j in zip(range(1, 5), js, strict=True)
        ]
    )
    out = {(r["constraint_type"], r["rule"]): r for r in F.stopping_rules(frame, cmp, settle=0.5).iter_rows(named=True)}
    # mapping: loss rises at checkpoint 3 -> keep 2, trained to 3 (30 steps)
    assert (out["mapping", "loss"]["kept_checkpoint"], out["mapping", "loss"]["steps_trained"]) == (2, 30)
    assert out["mapping", "loss"]["accuracy"] == 1
    # mapping: Jaccard with the previous checkpoint reaches 0.5 at checkpoint 3
    assert (out["mapping", "circuit"]["kept_checkpoint"], out["mapping", "circuit"]["steps_trained"]) == (3, 30)
    assert out["mapping", "oracle"]["kept_checkpoint"] == 2
    # spatial: neither rule fires -> both run to the end; oracle at the first accuracy >= 0.9
    assert out["spatial", "loss"]["kept_checkpoint"] == out["spatial", "circuit"]["kept_checkpoint"] == 4
    assert out["spatial", "oracle"]["kept_checkpoint"] == 3


def test_graph_prompts(lm):
    cfg = RECIPES["cpu"]
    rows = graph_prompts(lm.tokenizer, SEED_PROMPTS[: cfg.seed_prompts], cfg.graph_words, cfg.graph_per_word)
    seeds = [r for r in rows if r["constraint_type"] == "seed"]
    assert [r["text"] for r in seeds] == [f"User: {s}\nAssistant: " for s in SEED_PROMPTS]  # smoke BPE: no template
    for ctype, words in CONSTRAINTS.items():
        mine = [r for r in rows if r["constraint_type"] == ctype]
        assert len(mine) == cfg.graph_words * cfg.graph_per_word
        for r in mine:
            assert r["target"] == words[r["word"]] and r["word"] in r["text"]
            assert r["target_id"] == lm.tokenizer(" " + r["target"], add_special_tokens=False)["input_ids"][0]
    assert len({r["prompt_id"] for r in rows}) == len(rows)


def test_circuit_stats_pairs_prompts():
    graphs, cmp = [], []
    for p, shift in (("a", 0.1), ("b", 0.2), ("c", 0.3)):
        for i in range(5):
            graphs.append(
                {
                    "prompt_id": p,
                    "constraint_type": "mapping",
                    "checkpoint": i,
                    "fraction": i / 4,
                    "error_share": 0.5 - shift * (i == 4),
                    "target_from_features": float(i),
                    "target_prob": 0.1 * i,
                    "n_kept_features": 10 + i,
                }
            )
            if i:
                cmp.append(
                    {
                        "prompt_id": p,
                        "constraint_type": "mapping",
                        "checkpoint": i,
                        "fraction": i / 4,
                        "versus": "previous",
                        "feature_jaccard": 0.2 + 0.2 * (i == 4),
                        "edge_correlation": 0.5,
                    }
                )
            cmp.append(
                {
                    "prompt_id": p,
                    "constraint_type": "mapping",
                    "checkpoint": i,
                    "fraction": i / 4,
                    "versus": "final",
                    "feature_jaccard": 1.0 if i == 4 else 0.5,
                    "edge_correlation": 0.9,
                }
            )
    stats, tests = F.circuit_stats(pl.DataFrame(graphs), pl.DataFrame(cmp))
    t = {r["metric"]: r for r in tests.iter_rows(named=True)}
    err = t["error_share"]
    assert err["diff_mean"] == pytest.approx(-0.2) and err["p_sign_flip"] == pytest.approx(2 / 8)
    assert t["target_from_features"]["diff_mean"] == 4.0
    settle = t["feature_jaccard with previous checkpoint"]
    assert (settle["a_mean"], settle["b_mean"]) == (pytest.approx(0.2), pytest.approx(0.4))
    assert t["edge_correlation with previous checkpoint"]["p_sign_flip"] == 1.0  # no change at all
    row = stats.filter((pl.col("metric") == "feature_jaccard") & (pl.col("checkpoint") == 2))
    assert row["mean"][0] == pytest.approx(0.5) and row["n"][0] == 3


def test_gpu_path_says_what_is_missing(monkeypatch):
    from lab.errors import LabError

    p, cfg = get_profile("gpu"), RECIPES["gpu"]
    assert cfg.model == "google/gemma-2-2b" and cfg.hub_transcoders == "gemma"
    if not torch.cuda.is_available():
        with pytest.raises(LabError, match="CUDA"):
            E.base_model(p, cfg)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(LabError, match="'gemma' transcoders from the Hugging Face hub.*unset HF_HUB_OFFLINE"):
        E.circuit_transcoders(p, cfg, progress=False)


def test_settle_sweep_is_the_circuit_rule_at_each_threshold():
    frame = _frame([5, 2, 1, 1.5, 1.8], [5, 4, 3, 2, 1], [0.25, 0.5, 1, 1, 1], [0.2, 0.2, 0.4, 0.95, 1])
    cmp = pl.DataFrame(
        [
            {"constraint_type": c, "checkpoint": i, "versus": "previous", "feature_set_jaccard": j}
            for c in ("mapping", "spatial")
            for i, j in zip(range(1, 5), [0.5, 0.55, 0.85, 0.99], strict=True)
        ]
    )
    sweep = F.settle_sweep(frame, cmp, thresholds=(0.5, 0.6, 0.9, 1.0))
    got = sweep.filter(pl.col("constraint_type") == "mapping").sort("settle")["kept_checkpoint"].to_list()
    assert got == [2, 3, 4, 4]  # 0.55 >= 0.5 at checkpoint 2; 0.85 >= 0.6 at 3; 0.99 >= 0.9 at 4; never -> last


def test_compare_frame_pairs_each_graph_with_previous_final_and_base(traced):
    """Every graph against the previous checkpoint, the final one and the base, never against itself."""
    rec, rec2, _, _, _ = traced
    records = [
        dict(r, prompt_id="p", constraint_type="mapping", checkpoint=i, fraction=i / 2)
        for i, r in enumerate((rec, rec2, rec))
    ]
    cmp = F.compare_frame(records)
    pairs = set(zip(cmp["checkpoint"].to_list(), cmp["versus"].to_list(), strict=True))
    assert pairs == {(0, "final"), (1, "previous"), (1, "final"), (1, "base"), (2, "previous"), (2, "base")}
    assert cmp.height == len(pairs) and (cmp["feature_jaccard"] == 1.0).all()  # the same graph three times
