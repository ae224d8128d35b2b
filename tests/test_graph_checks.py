"""lab.interp.graph_checks on a tiny Llama with tiny trained skip transcoders (the smoke recipe: b_dec is not zero):
the full accounting of a graph that selects only some of the active features adds up to the model's own demeaned
logit, and the frozen intervention reproduces the graph's direct effects."""

from __future__ import annotations

import pytest
import torch

from lab.data.corpus import smoke_corpus
from lab.interp import circuits as C
from lab.interp import graph_checks as G
from lab.interp import transcoders as T
from lab.models.loading import load_tiny_model
from lab.tracks.E_circuits.config import RECIPES

PROMPT = "The king speaks of the moon and"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    lm = load_tiny_model("llama", seed=0)
    root = tmp_path_factory.mktemp("checks")
    T.build(RECIPES["smoke"].transcoders, lm, root / "tc", corpus=smoke_corpus(), progress=False)
    tcs, meta = T.load_transcoders(root / "tc")
    assert meta["skip"] and all(tc.b_dec.abs().max().item() > 0 for tc in tcs)  # the terms the old test zeroed
    rm = C.replacement_model(C.export_model(lm.model, lm.tokenizer, root / "model"), tcs)
    target = lm.tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    rec, graph = C.trace(rm, PROMPT, target_id=target, max_feature_nodes=4)
    return lm, rm, rec, graph, target


def test_the_accounting_adds_up_to_the_models_own_logit_on_a_partial_graph(setup):
    lm, rm, rec, graph, target = setup
    assert 0 < rec["n_selected_features"] < rec["n_active_features"]  # the graph leaves features out
    parts = G.account(rm, graph.input_tokens, target, graph.selected_features)
    with torch.no_grad():
        logits = lm.model(graph.input_tokens[None]).logits[0, -1].double()  # HF's own forward, no circuit-tracer
    truth = float(logits[target] - logits.mean())
    assert parts["demeaned_logit"] == pytest.approx(truth, abs=1e-4)
    terms = ("selected_features", "unselected_features", "errors", "tokens", "b_dec", "bos_mlp")
    assert sum(parts[t] for t in terms) == pytest.approx(truth, abs=1e-4) and abs(parts["residual"]) < 1e-4
    for t in ("unselected_features", "b_dec", "bos_mlp"):  # each missing term is really there
        assert abs(parts[t]) > 1e-4 * abs(truth), (t, parts)
    # the graph's own row is the selected / error / token part of the full one
    assert parts["selected_features"] == pytest.approx(rec["target_from_features"], abs=1e-5)
    assert parts["errors"] == pytest.approx(rec["target_from_errors"], abs=1e-5)
    assert parts["tokens"] == pytest.approx(rec["target_from_tokens"], abs=1e-5)


@pytest.mark.parametrize("scale", [0.0, 2.0])
def test_frozen_interventions_reproduce_the_graphs_direct_effects(setup, scale):
    lm, rm, rec, graph, target = setup
    ti = [t.vocab_idx for t in graph.logit_targets].index(target)
    rows = G.intervene(rm, lm.model, graph, ti, top=4, scale=scale)
    assert len(rows) == 4 and len({r["key"] for r in rows}) == 4
    for r in rows:
        assert abs(r["predicted"]) > 0
        assert r["measured_direct"] == pytest.approx(r["predicted"], rel=1e-3, abs=1e-5), r["key"]
    # the strongest first
    assert abs(rows[0]["predicted"]) >= abs(rows[-1]["predicted"])
    # the whole-model hook against circuit-tracer's own unfrozen intervention (given the prompt as text, which this
    # tokenizer gives back exactly)
    assert rm.ensure_tokenized(PROMPT).tolist() == graph.input_tokens.tolist()
    base = G._demeaned(rm.feature_intervention(PROMPT, [], freeze_attention=False)[0], target)
    for r in rows[:2]:
        change = [(r["layer"], r["pos"], r["feature"], scale * r["activation"])]
        theirs = G._demeaned(rm.feature_intervention(PROMPT, change, freeze_attention=False)[0], target) - base
        assert r["measured"] == pytest.approx(theirs, rel=1e-3, abs=1e-5), r["key"]
