"""The rest of the wind-tunnel table: the HMM task against brute-force enumeration, Paper II's single head against
analytic values, and the scale ladder's verdict trends against hand-worked cases."""

from __future__ import annotations

import math
from dataclasses import replace

import polars as pl
import pytest
import torch

from lab.data.hmm import (
    HEADER,
    MIN_PROB,
    N_STATES,
    OBS0,
    brute_force_filter,
    forward_filter,
    hmm_metrics,
    random_rows,
    sample_hmm_batch,
    soft_cross_entropy,
    state_log_probs,
)
from lab.errors import LabError
from lab.interp.windtunnel_claims import NOT_TESTABLE, trend
from lab.models.windtunnel import ModelSpec
from lab.train.em_attention import (
    EMConfig,
    chain_entropy_nats,
    head_loss,
    init_head,
    make_task,
    speedup,
    sticky_chain,
    train_head,
)
from lab.train.hmm import train_hmm
from lab.train.windtunnel import TrainConfig


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


class TestHMM:
    def test_forward_algorithm_equals_summing_over_every_hidden_path(self):
        b = sample_hmm_batch(6, 5, torch.Generator().manual_seed(3))
        for i in range(6):
            truth = brute_force_filter(b.trans[i], b.emit[i], b.obs[i])  # 5^t paths at each t
            assert torch.allclose(b.posterior[i], truth, atol=1e-12)

    def test_matrices_are_stochastic_floored_and_in_hundredths(self):
        m = random_rows(2000, 5, 5, torch.Generator().manual_seed(0))
        assert torch.allclose(m.sum(-1), torch.ones(2000, 5, dtype=torch.float64), atol=1e-12)
        assert m.min() >= MIN_PROB - 1e-12
        assert torch.allclose(m * 100, torch.round(m * 100), atol=1e-9)

    def test_tokens_spell_the_matrices_and_observations(self):
        b = sample_hmm_batch(4, 7, torch.Generator().manual_seed(1))
        assert torch.equal(b.tokens[:, 1:26], torch.round(b.trans * 100).long().flatten(1))
        assert torch.equal(b.tokens[:, 27:52], torch.round(b.emit * 100).long().flatten(1))
        assert torch.equal(b.tokens[:, HEADER:], b.obs + OBS0)

    def test_observations_follow_the_emission_rows(self):
        # E[1{o_1 = j}] = E[emit[s_1, j]] over many fresh HMMs: the sampler draws symbols from the matrices shown
        b = sample_hmm_batch(40_000, 2, torch.Generator().manual_seed(2))
        rows = torch.arange(40_000)
        for t in range(2):
            for j in range(5):
                freq = (b.obs[:, t] == j).double().mean()
                assert freq == pytest.approx(b.emit[rows, b.states[:, t], j].mean().item(), abs=0.01)
        # and states follow the transition rows
        moved = (b.states[:, 1] == 0).double().mean()
        assert moved == pytest.approx(b.trans[rows, b.states[:, 0], 0].mean().item(), abs=0.01)

    def test_metrics_are_zero_at_the_posterior_and_analytic_for_a_uniform_guess(self):
        b = sample_hmm_batch(64, 6, torch.Generator().manual_seed(4))
        exact = hmm_metrics(b.posterior.log(), b.posterior)
        assert exact["kl"].abs().max() < 1e-9 and exact["abs_err"].max() < 1e-9
        uniform = torch.full_like(b.posterior, -math.log(N_STATES))
        m = hmm_metrics(uniform, b.posterior)  # KL(p || u) = log2 S - H(p) = |H(u) - H(p)|
        assert torch.allclose(m["kl"], math.log2(N_STATES) - m["h_bayes"], atol=1e-9)
        assert torch.allclose(m["kl"], m["abs_err"], atol=1e-9)

    def test_loss_is_kl_plus_the_posterior_entropy(self):
        b = sample_hmm_batch(16, 4, torch.Generator().manual_seed(5))
        logits = torch.randn(16, HEADER + 4, 200, generator=torch.Generator().manual_seed(0))
        logp = state_log_probs(logits)
        m = hmm_metrics(logp, b.posterior)
        nats = (m["kl"] + m["h_bayes"]).mean() / math.log2(math.e)
        assert soft_cross_entropy(logp, b.posterior).item() == pytest.approx(nats.item(), rel=1e-6)

    def test_forward_filter_of_an_uninformative_emission_is_the_propagated_prior(self):
        trans = random_rows(1, 5, 5, torch.Generator().manual_seed(6))
        emit = torch.full((1, 5, 5), 0.2, dtype=torch.float64)
        post = forward_filter(trans, emit, torch.tensor([[0, 3, 1]]))
        prior = torch.full((5,), 0.2, dtype=torch.float64)
        for t in range(3):
            assert torch.allclose(post[0, t], prior, atol=1e-12)
            prior = prior @ trans[0]

    def test_training_learns_and_a_second_call_loads_the_run(self, tmp_path):
        spec = ModelSpec("transformer", n_layer=1, n_head=2, d_model=16)
        cfg = TrainConfig(steps=40, batch_size=32, lr=3e-3, warmup=5, eval_every=20, eval_sequences=64)
        run = train_hmm(spec, cfg, 0, tmp_path, K=4, K_long=6, progress=False)
        assert run.log["kl_bits"][-1] < run.log["kl_bits"][0]  # better than the untrained model's guess
        again = train_hmm(spec, cfg, 0, tmp_path, K=4, K_long=6, progress=False)
        assert again.cached and again.log.equals(run.log)
        with pytest.raises(LabError, match="K_long"):
            train_hmm(spec, cfg, 0, tmp_path, K=6, K_long=4, progress=False)


class TestPaperII:
    def test_sticky_chain_is_stochastic_with_its_diagonal_and_inverse_distance_rows(self):
        P = sticky_chain(8, 0.3)
        assert torch.allclose(P.sum(1), torch.ones(8, dtype=torch.float64))
        assert torch.allclose(P.diagonal(), torch.full((8,), 0.3, dtype=torch.float64))
        assert P[0, 1] / P[0, 2] == pytest.approx(2.0) and P[0, 1] == pytest.approx(P[0, 7])  # 1/d, circular

    def test_sampled_chain_follows_its_matrix(self):
        x, y, P = make_task(EMConfig(T=60_000), seed=0)
        stays = (y[1:] == y[:-1]).double().mean()
        assert stays == pytest.approx(0.3, abs=0.01)
        assert x.shape == (60_000, 20)

    def test_zero_output_map_scores_log_of_the_symbols(self):
        cfg = EMConfig(T=50)
        x, y, _ = make_task(cfg, 0)
        w = init_head(cfg, 0)
        w["W_O"] = torch.zeros_like(w["W_O"])
        assert head_loss(w, x, y).item() == pytest.approx(math.log(8), abs=1e-6)
        assert chain_entropy_nats(sticky_chain(8, 0.3)) < math.log(8)

    def test_em_schedule_with_the_sgd_rate_is_sgd(self):
        cfg = EMConfig(T=40, steps=15)
        assert train_head(cfg, 1, cfg.lr) == train_head(replace(cfg, value_lr=cfg.lr), 1, cfg.lr)
        faster = train_head(cfg, 1, cfg.value_lr)
        assert faster[-1] < train_head(cfg, 1, cfg.lr)[-1]  # a larger value step lowers the loss sooner

    def test_speedup_is_sgd_steps_over_the_mean_steps_and_a_miss_counts_sgds(self):
        rows = pl.DataFrame({"sgd_steps": [1000, 1000, 1000], "em_steps_to_sgd_final": [400, 500, None]})
        assert speedup(rows) == pytest.approx(1000 / ((400 + 500 + 1000) / 3))


class TestLadderTrend:
    @pytest.mark.parametrize(
        ("verdicts", "values", "expected"),
        [
            (["reproduced"] * 3, [0.1, 0.1, 0.1], "holds at every size tried"),
            (["not reproduced", "reproduced", "reproduced"], [0.3, 0.1, 0.05], "holds from M up"),
            (["reproduced", "not reproduced", "reproduced"], [0, 0, 0], "not monotonically"),
            (["not reproduced"] * 3, [0.9, 0.5, 0.2], "moves toward the paper's value with size"),
            (["not reproduced", "partly", "not reproduced"], [0.9, 0.95, 0.2], "does not hold at any size tried"),
            ([NOT_TESTABLE, "not reproduced", "reproduced"], [0, 0.5, 0.1], "holds from L up"),
            ([NOT_TESTABLE], [0.0], "not testable at any size tried"),
        ],
    )
    def test_trend_reads_the_verdicts_smallest_first(self, verdicts, values, expected):
        labels = ["S", "M", "L"][: len(verdicts)]
        assert expected in trend(verdicts, values, 0.0, labels)


def test_ladder_frames_judge_each_claim_at_every_size(tmp_path):
    # the smoke recipe's ladder through the track's own frames: a one-layer rung cannot show sharpening with depth
    from lab.profiles import get_profile
    from lab.tracks.D_bayes.config import config_for

    cfg = config_for(get_profile("smoke"))
    assert cfg.ladder[0].model.n_layer == 1
    from lab.data.windtunnel import sample_batch
    from lab.interp.windtunnel_claims import Rung, ladder_frames, verdict_grid
    from lab.train.windtunnel import train_run

    runs = [
        (
            Rung(c.label, c.model, c.train.lr),
            0,
            train_run("r", cfg.V, c.model, replace(c.train, steps=5), 0, tmp_path, progress=False),
        )
        for c in cfg.ladder
    ]
    paper = {"key_cos_max": 0.1, "pc1_min": 0.8, "key_cos": 0.05}
    batch = sample_batch(cfg.V, 64, torch.Generator().manual_seed(0))
    scale, layers, verdicts = ladder_frames(runs, batch, 1.0, paper)
    assert scale["size"].to_list() == [c.label for c in cfg.ladder]
    assert layers.group_by("size").agg(pl.len()).sort("size")["len"].to_list() == sorted(
        c.model.n_layer for c in cfg.ladder
    )
    sharp = verdicts.filter(pl.col("key") == "sharpening").sort("n_params")
    assert sharp["verdict"][0] == NOT_TESTABLE and sharp["verdict"][1] != NOT_TESTABLE
    assert verdicts.height == 6 * len(cfg.ladder)
    grid = verdict_grid(verdicts)  # one row per claim, a column per size, smallest first
    assert grid.columns == ["claim", *(c.label for c in cfg.ladder), "trend"] and grid.height == 6
    for row in verdicts.iter_rows(named=True):
        assert grid.filter(pl.col("claim") == row["claim"])[row["size"]].item() == row["verdict"]
