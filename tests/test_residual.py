"""lab.residual: norms, contributions, logit lens, position similarity and ablation, against brute force and
exact identities on tiny models."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch

from lab.errors import LabError
from lab.interp import residual as res
from lab.interp.attention import token_labels
from lab.interp.names import act_name


@pytest.fixture(scope="module")
def llama():
    from lab.models.loading import load_tiny_model

    return load_tiny_model("llama")


@pytest.fixture(scope="module")
def probe(llama):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(llama.tokenizer), (1, 12), generator=g)
    cap, n = res.capture_residuals(llama.model, ids)
    return ids, cap, n, token_labels(llama.tokenizer, ids[0].tolist())


class TestNormsAndContributions:
    """Residual norms and what each sublayer writes."""

    def test_norms(self, probe):
        _ids, cap, n, labels = probe
        df = res.residual_norms(cap, n, labels)
        assert df.height == n * 3 * 12
        row = df.filter((pl.col("layer") == 1) & (pl.col("point") == "mid") & (pl.col("position") == 5)).row(
            0, named=True
        )
        assert row["norm"] == pytest.approx(float(cap[act_name("resid_mid", 1)][0, 5].norm()), rel=1e-6)

    def test_contributions_match_brute_force(self, probe):
        _ids, cap, n, labels = probe
        df = res.contributions(cap, n, labels)
        for layer, sub, pos in ((0, "attention", 3), (1, "mlp", 7)):
            row = df.filter((pl.col("layer") == layer) & (pl.col("sublayer") == sub) & (pl.col("position") == pos)).row(
                0, named=True
            )
            out = cap[act_name("attn_out" if sub == "attention" else "mlp_out", layer)][0, pos].double()
            stream = cap[act_name("resid_pre" if sub == "attention" else "resid_mid", layer)][0, pos].double()
            final = cap[act_name("resid_post", n - 1)][0, pos].double()
            assert row["norm"] == pytest.approx(float(out.norm()), rel=1e-6)
            assert row["proj_stream"] == pytest.approx(float(out @ stream / stream.norm()), rel=1e-6)
            assert row["cos_stream"] == pytest.approx(float(out @ stream / stream.norm() / out.norm()), rel=1e-6)
            assert row["proj_final"] == pytest.approx(float(out @ final / final.norm()), rel=1e-6)
        shares = df.group_by("layer", "position").agg(pl.col("share").sum())["share"]
        assert (shares - 1).abs().max() < 1e-9

    def test_one_sequence_only(self, llama):
        with pytest.raises(LabError, match="one sequence"):
            res.capture_residuals(llama.model, torch.ones(2, 5, dtype=torch.long))


class TestLogitLens:
    """The lens at the last depth is the model's own output; depth 0 reads the embeddings."""

    def test_last_depth_is_the_output(self, llama, probe):
        _ids, cap, n, labels = probe
        lens = res.logit_lens(llama.model, cap, n, llama.tokenizer, labels)
        assert lens.height == (n + 1) * 12
        last = lens.filter(pl.col("depth") == n)
        assert (
            last["kl_to_final"].max() < 1e-9 and last["matches_final"].all() and (last["final_token_rank"] == 0).all()
        )
        assert (lens["kl_to_final"] >= 0).all()

    def test_depth_zero_reads_the_embeddings(self, llama, probe):
        ids, cap, n, labels = probe
        lens = res.logit_lens(llama.model, cap, n, llama.tokenizer, labels)
        with torch.no_grad():
            emb = llama.model.get_input_embeddings()(ids)
            logits = llama.model.get_output_embeddings()(llama.model.model.norm(emb))[0]
        top = logits.argmax(-1).tolist()
        got = lens.filter(pl.col("depth") == 0).sort("position")["top_token"].to_list()
        assert got == [llama.tokenizer.decode([t]) for t in top]
        p = logits.double().softmax(-1)
        row = lens.filter((pl.col("depth") == 0) & (pl.col("position") == 4)).row(0, named=True)
        assert row["top_prob"] == pytest.approx(float(p[4].max()), rel=1e-6)
        final = cap.logits[0, 4].double().log_softmax(-1)
        assert row["kl_to_final"] == pytest.approx(float((final.exp() * (final - p[4].log())).sum()), rel=1e-6)

    def test_first_stable_depth(self):
        lens = pl.DataFrame(
            {
                "depth": [0, 1, 2, 3] * 2,
                "position": [0] * 4 + [1] * 4,
                "token": ["a"] * 4 + ["b"] * 4,
                "matches_final": [True, False, True, True, True, True, True, True],
            }
        )
        out = res.first_stable_depth(lens)
        assert out["first_stable_depth"].to_list() == [2, 0]


class TestSimilarityAndAblation:
    """Position similarity against numpy-free brute force; ablation effects."""

    def test_position_similarity(self, probe):
        _ids, cap, n, _labels = probe
        summary, maps = res.position_similarity(cap, n, layers=[1])
        x = cap[act_name("resid_post", 1)][0].double()
        T = x.shape[0]
        cos = [[float(x[i] @ x[j] / (x[i].norm() * x[j].norm())) for j in range(T)] for i in range(T)]
        pairs = [cos[i][j] for i in range(T) for j in range(i + 1, T)]
        no0 = [cos[i][j] for i in range(1, T) for j in range(i + 1, T)]
        row = summary.filter(pl.col("layer") == 1).row(0, named=True)
        assert row["mean_cos_all"] == pytest.approx(sum(pairs) / len(pairs), rel=1e-6)
        assert row["mean_cos_without_first"] == pytest.approx(sum(no0) / len(no0), rel=1e-6)
        adjacent = [cos[i][i + 1] for i in range(1, T - 1)]
        assert row["mean_cos_adjacent"] == pytest.approx(sum(adjacent) / len(adjacent), rel=1e-6)
        assert maps.height == T * (T + 1) // 2 and set(maps["layer"]) == {1}
        diag = maps.filter(pl.col("i") == pl.col("j"))["cos"]
        assert (diag - 1).abs().max() < 1e-9

    def test_ablation_effects(self, llama, probe):
        ids, cap, n, _labels = probe
        df = res.ablation_effects(llama.model, ids, n, cap.logits)
        assert df.height == 2 * n and (df["kl_mean"] >= 0).all()
        assert df["kl_mean"].max() > 0  # removing a sublayer changes something
        assert not any(math.isnan(v) for v in df["delta_logprob_last"])

    def test_charts_build(self, llama, probe):
        """The residual-stream track's charts build from these frames (and their aggregates)."""
        from lab.tracks.C_probing import charts, frames

        _ids, cap, n, labels = probe
        charts.norms(frames.norms_by_layer(res.residual_norms(cap, n, labels))).to_dict()
        contrib = res.contributions(cap, n, labels)
        charts.contribution_profile(frames.contributions_by_layer(contrib)).to_dict()
        charts.contribution_tokens(contrib).to_dict()
        charts.logit_lens(res.logit_lens(llama.model, cap, n, llama.tokenizer, labels)).to_dict()
        summary, maps = res.position_similarity(cap, n, layers=[0, 1])
        charts.similarity_profile(summary).to_dict()
        charts.similarity_maps(maps).to_dict()
