"""The fast transcoder paths against the fp32 reference: the TopK-sparse step (``lab.interp.topk``) is the dense
step's arithmetic in fp32 (loss, gradients, Adam updates); short smoke builds reach the same held-out quality; the
bf16 harvest stays close to fp32 and its weight copies change no number; configs refuse what they cannot run."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from lab.bench import transcoder as bench
from lab.data.corpus import smoke_corpus
from lab.errors import LabError
from lab.interp import topk
from lab.interp import transcoders as T
from lab.interp.harvest import bf16_layer_weights, harvest_precision, mlp_activations
from lab.models.loading import load_tiny_model
from lab.profiles import get_profile
from lab.tracks.E_circuits.config import config_for

CFG = config_for(get_profile("smoke")).transcoders  # the smoke recipe: sparse, bf16 (the defaults)
REFERENCE = {"sparse": False, "precision": "fp32", "auxk_alpha": 0.0}  # the dense fp32 step (it has no AuxK)


@pytest.fixture(scope="module")
def lm():
    return load_tiny_model("llama", seed=0)


def random_transcoder(d_model: int, n_features: int, k: int, seed: int = 0, skip: bool = False):
    """``new_transcoder``'s initialisation with random biases (and skip weights), so that every gradient term is
    exercised."""
    cfg = replace(CFG, d_transcoder=n_features, k=k, skip=skip)
    gen = torch.Generator().manual_seed(seed)
    tc = T.new_transcoder(d_model, cfg, 0, gen)
    with torch.no_grad():
        tc.b_enc.normal_(0, 0.3, generator=gen)
        tc.b_dec.normal_(0, 0.3, generator=gen)
        if skip:
            tc.W_skip.normal_(0, 0.1, generator=gen)
    return tc


def batch(tokens: int, d_model: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d_model, generator=gen)
    return x, x @ torch.randn(d_model, d_model, generator=gen) / d_model**0.5 + 0.5  # a learnable, off-centre target


# (d_model, features, k, tokens): 96 features take the two-stage TopK, 97 (prime) torch.topk itself
SHAPES = [(16, 96, 8, 40), (24, 97, 5, 33), (32, 256, 16, 64)]


class TestSparseStep:
    """The sparse step against circuit-tracer's dense forward with autograd, same weights, same batch."""

    @pytest.mark.parametrize(("d_model", "n", "k", "tokens"), SHAPES)
    def test_fp32_loss_and_gradients_are_the_dense_ones(self, d_model, n, k, tokens):
        """In fp32 the sparse step is an exact identity of the dense one, up to float summation order."""
        x, y = batch(tokens, d_model)
        dense, sparse = random_transcoder(d_model, n, k), random_transcoder(d_model, n, k)
        loss_dense = topk.dense_loss_and_grads(dense, x, y)
        loss_sparse = topk.loss_and_grads(sparse, sparse=True, select="fp32")(x, y)
        assert loss_sparse == pytest.approx(loss_dense, rel=1e-6)
        for (name, a), b in zip(dense.named_parameters(), sparse.parameters(), strict=True):
            assert a.grad.abs().max() > 0, name  # not trivially equal
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6 * float(a.grad.abs().max()), msg=name)

    def test_skip_connection_loss_and_gradients_are_the_dense_ones(self):
        """circuit-tracer's skip transcoder (its forward adds x @ W_skip.T): the sparse step's fp32 loss and every
        gradient, W_skip's included, are autograd's."""
        x, y = batch(40, 16)
        dense, sparse = random_transcoder(16, 96, 8, skip=True), random_transcoder(16, 96, 8, skip=True)
        loss = topk.dense_loss_and_grads(dense, x, y)
        assert topk.loss_and_grads(sparse, sparse=True, select="fp32")(x, y) == pytest.approx(loss, rel=1e-6)
        for (name, a), b in zip(dense.named_parameters(), sparse.parameters(), strict=True):
            assert a.grad.abs().max() > 0, name
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6 * float(a.grad.abs().max()), msg=name)

    @pytest.mark.parametrize("aux_tokens", [None, 20])
    def test_auxk_gradients_are_autograd_of_the_papers_loss(self, aux_tokens):
        """AuxK written densely from its definition (Gao et al. 2024, B.1): the dead features' top d_model/2
        pre-activations decode the main residual e (a constant); loss += alpha * min(dead / k_aux, 1) *
        |e_hat - e|^2 / sum |y - mean y|^2. The sparse step's gradients are autograd's of that total."""
        d, n, k, alpha, tokens = 16, 96, 8, 0.25, 40
        x, y = batch(tokens, d)
        ref, fast = random_transcoder(d, n, k, skip=True), random_transcoder(d, n, k, skip=True)
        dead = torch.zeros(n, dtype=torch.bool)
        dead[torch.randperm(n, generator=torch.Generator().manual_seed(3))[:30]] = True  # 30 dead > k_aux = 8
        step = topk.loss_and_grads(
            fast, sparse=True, select="fp32", auxk_alpha=alpha, dead_tokens=100, aux_tokens=aux_tokens
        )
        step.since_fired[dead] = 100
        step(x, y)

        rows = torch.arange(tokens) if aux_tokens is None else torch.linspace(0, tokens - 1, aux_tokens).round().long()
        pre = x @ ref.W_enc.T + ref.b_enc
        top = pre.topk(k, dim=1)
        acts = torch.zeros_like(pre).scatter(1, top.indices, top.values)
        y_hat = acts @ ref.W_dec + ref.b_dec + x @ ref.W_skip.T
        total = ((y - y.mean(0)) ** 2).sum()
        k_aux = d // 2
        aux_pre = pre[rows].masked_fill(~dead, float("-inf")).topk(k_aux, dim=1)
        aux_acts = torch.zeros(len(rows), n).scatter(1, aux_pre.indices, aux_pre.values)
        e = (y - y_hat).detach()[rows]
        aux = alpha * min(30 / k_aux, 1.0) * ((aux_acts @ ref.W_dec - e) ** 2).sum() / total
        (((y_hat - y) ** 2).sum() / total + aux).backward()
        assert step.last_aux == pytest.approx(aux.item(), rel=1e-5) and aux.item() > 0
        for (name, a), b in zip(ref.named_parameters(), fast.parameters(), strict=True):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6 * float(a.grad.abs().max()), msg=name)

    def test_the_dead_clock_counts_tokens_since_each_feature_fired(self):
        x, y = batch(10, 16)
        step = topk.loss_and_grads(random_transcoder(16, 96, 8), sparse=True, select="fp32", auxk_alpha=0.1)
        step(x, y)
        step(x, y)
        fired = (step.tc.encode(x) != 0).any(0)
        assert torch.equal(step.since_fired, torch.where(fired, 0, 20))  # same batch twice: never-fired ones at 20

    @pytest.mark.parametrize(("n", "k"), [(96, 8), (2304, 32), (97, 5), (64, 64), (512, 1)])
    def test_two_stage_topk_chooses_torch_topks_features(self, n, k):
        gen = torch.Generator().manual_seed(n + k)
        pre = torch.randn(300, n, generator=gen)
        pre[:5] = pre[:5].sort(dim=1).values  # rows whose top k sit together in the last columns
        ours = topk.topk_indices(pre, k).sort(dim=1).values
        assert torch.equal(ours, pre.topk(k, dim=1).indices.sort(dim=1).values)

    def test_bf16_choice_stays_close_to_the_fp32_step(self):
        """bf16 only chooses the features (near-ties at the k-th place may swap): the loss moves by < 1 %."""
        x, y = batch(128, 32)
        dense, fast = random_transcoder(32, 256, 16), random_transcoder(32, 256, 16)
        loss = topk.dense_loss_and_grads(dense, x, y)
        assert topk.loss_and_grads(fast, sparse=True, select="bf16")(x, y) == pytest.approx(loss, rel=0.01)

    def test_fused_adam_steps_follow_the_dense_adam_steps(self):
        """Five steps each way from the same weights: the same parameters within 1e-5 (relative)."""
        x, y = batch(48, 16)
        tcs = {"dense": [random_transcoder(16, 96, 8, s) for s in (0, 1)]}
        tcs["sparse"] = copy.deepcopy(tcs["dense"])
        for name, pair in tcs.items():
            sparse = name == "sparse"
            steps = [topk.loss_and_grads(tc, sparse=sparse) for tc in pair]
            opts = topk.optimizers(pair, 1e-2, sparse=sparse)
            for _ in range(5):
                for step in steps:
                    step(x, y)
                for opt in opts:
                    opt.step()
        for a, b in zip(tcs["dense"], tcs["sparse"], strict=True):
            for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
                torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-5 * float(p.detach().abs().max()), msg=name)


def test_short_builds_reach_the_reference_quality(lm, tmp_path):
    """The smoke recipe built three ways: sparse fp32 gives the reference's held-out FVU to 1e-4 (relative) and the
    same dead features; sparse with bf16 harvest and choice (the default) its FVU within 0.02 and its dead share
    within two features of 128."""
    metas = {
        name: T.build(cfg, lm, tmp_path / name, corpus=smoke_corpus(), fresh=True, progress=False)["layers"]
        for name, cfg in {
            "reference": replace(CFG, **REFERENCE),
            "sparse fp32": replace(CFG, precision="fp32", auxk_alpha=0.0),
            "sparse bf16": replace(CFG, auxk_alpha=0.0),
        }.items()
    }
    for ref, exact, fast in zip(*metas.values(), strict=True):
        assert ref["fvu"] < 0.8  # it learned something
        assert exact["fvu"] == pytest.approx(ref["fvu"], rel=1e-4) and exact["dead_share"] == ref["dead_share"]
        assert fast["fvu"] == pytest.approx(ref["fvu"], abs=0.02)
        assert abs(fast["dead_share"] - ref["dead_share"]) <= 2 / CFG.d_transcoder


class TestHarvest:
    """The bf16 training harvest against today's fp32 whole-model forward."""

    def test_stopping_after_the_last_layer_changes_nothing(self, lm):
        ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46]])
        full, body = mlp_activations(lm.model, ids, full_forward=True), mlp_activations(lm.model, ids)
        for a, b in zip(full[0] + full[1], body[0] + body[1], strict=True):
            assert torch.equal(a, b)

    def test_bf16_harvest_stays_within_two_percent(self, lm):
        """Measured on SmolLM2-135M: ~1 % (inputs) and ~1.4 % (outputs); the tiny model moves less."""
        ids = torch.randint(3, lm.model.config.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
        ref = mlp_activations(lm.model, ids)
        with harvest_precision("bf16"):
            fast = mlp_activations(lm.model, ids)
        for got, want in zip(fast, ref, strict=True):
            rel, floor = bench.activation_shift(got, want)
            assert 0 < rel < 0.02 and floor < 1e-3

    def test_bf16_weight_copies_change_no_number_and_are_put_back(self, lm):
        ids = torch.randint(3, lm.model.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
        before = [p for p in lm.model.parameters()]
        with harvest_precision("bf16"):
            autocast_only = mlp_activations(lm.model, ids)
        with bf16_layer_weights(lm.model), harvest_precision("bf16"):
            assert lm.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
            held = mlp_activations(lm.model, ids)
        for a, b in zip(autocast_only[0] + autocast_only[1], held[0] + held[1], strict=True):
            assert torch.equal(a, b)
        after = list(lm.model.parameters())
        assert len(after) == len(before) and all(a is b for a, b in zip(after, before, strict=True))


def test_benchmark_paths_agree_on_smoke():
    """The ``transcoder`` row's two paths, same weights and batch, six steps: mean losses within 1 %."""
    row, losses = bench.compare(get_profile("smoke"), repeats=5)
    assert row.workload == "transcoder" and set(losses) == {"dense", "sparse"}
    dense, sparse = (sum(v) / len(v) for v in (losses["dense"], losses["sparse"]))
    assert sparse == pytest.approx(dense, rel=0.01)


@pytest.mark.parametrize(
    ("change", "fix"),
    [
        ({"sparse": "yes"}, r"bad TranscoderConfig: sparse must be True or False \(got 'yes'\)"),
        ({"precision": "fp16"}, r"precision must be one of 'bf16', 'fp32' \(got 'fp16'\)"),
        ({"sparse": False}, r"precision='bf16' needs sparse=True: the dense step is the fp32 reference; use"),
    ],
)
def test_config_refuses_what_it_cannot_run(change, fix):
    with pytest.raises(LabError, match=fix):
        replace(CFG, **change)
