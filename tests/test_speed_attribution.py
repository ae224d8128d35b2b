"""The fast attribution setting (a small batch with the re-ranking schedule held) traces the same graph as the lab's
first setting (batch 64), on the tiny Llama with TopK transcoders; the schedule is what decides the graph."""

import pytest
import torch

from lab.bench import attribution as bench
from lab.data.constraints import graph_prompts
from lab.errors import LabError
from lab.interp import circuits as C
from lab.models.loading import load_tiny_model

MAX_NODES = 300  # more than RERANK_EVERY, so the queue is re-ranked once mid-graph (as on the cpu recipe)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    lm = load_tiny_model("llama", seed=0)
    cfg = lm.model.config
    transcoders = bench.random_transcoders(cfg.num_hidden_layers, cfg.hidden_size, 64, 16)  # a shape where it matters
    model = C.replacement_model(C.export_model(lm.model, lm.tokenizer, tmp_path_factory.mktemp("m") / "m"), transcoders)
    prompt = next(p for p in graph_prompts(lm.tokenizer, ["Write a poem about trees"], 1, 1) if p["target_id"])
    return model, prompt


def traced(setup, batch_size):
    model, prompt = setup
    return C.trace(
        model, prompt["text"], target_id=prompt["target_id"], max_feature_nodes=MAX_NODES, batch_size=batch_size
    )


@pytest.fixture(scope="module")
def baseline(setup):
    return traced(setup, 64)


class TestSameGraph:
    """Rows are independent backward contractions and the re-ranking points are fixed, so the batch size changes
    the time only: the same features in the same order, the same adjacency (bitwise here; asserted to 1e-6), the
    same record."""

    @pytest.mark.parametrize("batch_size", [C.BATCH_SIZE["cpu"], 4, 256])
    def test_batch_size_gives_the_same_graph(self, setup, baseline, batch_size):
        rec_a, a = baseline
        rec_b, b = traced(setup, batch_size)
        assert a.active_features.shape[0] > MAX_NODES  # features were chosen, not all taken
        assert torch.equal(a.selected_features, b.selected_features)
        torch.testing.assert_close(b.adjacency_matrix, a.adjacency_matrix, rtol=1e-5, atol=1e-6)
        assert {f["key"] for f in rec_b["features"]} == {f["key"] for f in rec_a["features"]}
        for key in ("replacement_score", "completeness_score", "target_from_features", "target_from_errors"):
            assert rec_b[key] == pytest.approx(rec_a[key], rel=1e-5, abs=1e-6)

    def test_the_schedule_decides_the_graph(self, setup, baseline):
        """Not trivially satisfied: re-ranking after every batch of 64 (circuit-tracer's update_interval 1)
        selects other features than re-ranking every RERANK_EVERY."""
        from circuit_tracer import attribute

        model, prompt = setup
        other = attribute(
            prompt["text"],
            model,
            attribution_targets=torch.tensor([prompt["target_id"]]),
            max_n_logits=5,
            batch_size=64,
            update_interval=1,
            max_feature_nodes=MAX_NODES,
        )
        assert set(other.selected_features.tolist()) != set(baseline[1].selected_features.tolist())


@pytest.mark.parametrize("batch_size", [0, 48, 3.5])
def test_batch_size_must_divide_the_schedule(setup, batch_size):
    with pytest.raises(LabError, match=f"must divide {C.RERANK_EVERY}"):
        traced(setup, batch_size)


def test_default_batch_is_the_devices(setup, baseline):
    """``batch_size=None`` takes BATCH_SIZE of the model's device (cpu here), the same graph again."""
    _, graph = traced(setup, None)
    assert torch.equal(graph.selected_features, baseline[1].selected_features)
