"""The wind tunnel's fast path (runs side by side, key-positions-only forward) against the one-at-a-time fp32 path.

Truths: the model's own full forward (``key_logits``), each run trained alone by ``train_run`` (losses, weights and
metrics within float rounding), the same run trained alone by the fast path (bit for bit: one intra-op thread, and
nothing shared between runs), and ``evaluate`` on the returned weights (the logged metrics exactly).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import lab.train.ensemble as ensemble
from lab.bench.wind import measure
from lab.models.windtunnel import ModelSpec, build_model, key_logits
from lab.profiles import get_profile
from lab.train.ensemble import RunSpec, train_runs
from lab.train.windtunnel import TrainConfig, eval_batch, evaluate, train_run

V = 6
TF = ModelSpec("transformer", n_layer=2, n_head=2, d_model=16)
CFG = TrainConfig(steps=40, batch_size=32, lr=3e-3, warmup=5, eval_every=10, eval_sequences=128)
# Float rounding over 40 steps (measured: losses 6e-7, weights 1.3e-6 apart); ten times that, far below any effect.
LOSS_ATOL, WEIGHT_ATOL, MAE_ATOL = 1e-5, 2e-5, 1e-5

RUNS = [
    *(RunSpec(f"transformer-s{s}", TF, CFG, s) for s in (0, 1, 2)),
    RunSpec("search-1L", replace(TF, n_layer=1), replace(CFG, steps=20, lr=1e-3, weight_decay=0.1), 0),
    RunSpec("mlp", ModelSpec("mlp", n_layer=2, d_model=16), replace(CFG, steps=20), 0, match=2000),
    RunSpec("lstm", ModelSpec("lstm", n_layer=1, d_model=16), replace(CFG, steps=20), 0, match=2000),
]


def weights(run) -> dict[str, torch.Tensor]:
    return run.model.state_dict()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every run trained side by side, and each one alone by the baseline."""
    together = train_runs(V, RUNS, tmp_path_factory.mktemp("together"), progress=False)
    root = tmp_path_factory.mktemp("alone")
    alone = [train_run(r.name, V, r.spec, r.cfg, r.seed, root, match=r.match, progress=False) for r in RUNS]
    return together, alone


class TestKeyLogits:
    """The training forward equals the model's own forward at the key positions, values and gradients."""

    @pytest.mark.parametrize(
        "spec",
        [TF, replace(TF, n_layer=1), ModelSpec("mlp", n_layer=2, d_model=16), ModelSpec("lstm", n_layer=1, d_model=16)],
        ids=["gpt-2L", "gpt-1L", "mlp", "lstm"],
    )
    def test_matches_full_forward(self, spec):
        torch.manual_seed(0)
        model = build_model(spec, V, match=2000)
        tokens = torch.randint(0, 2 * V, (8, 2 * V - 3))
        out = model(tokens)
        full = (out[0] if isinstance(out, tuple) else out)[:, 0::2]
        full.square().sum().backward()
        want = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        fast = key_logits(model, tokens)
        fast.square().sum().backward()
        torch.testing.assert_close(fast, full, atol=1e-6, rtol=1e-5)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[n], atol=1e-6, rtol=1e-5, msg=n)

    def test_hooked_model_takes_its_own_forward(self):
        """A hook on a hook point must see the activation: the full forward runs (the hook is called)."""
        torch.manual_seed(0)
        model = build_model(TF, V)
        seen = []
        model.blocks[1].hook_mlp_out.register_forward_hook(lambda m, a, out: seen.append(out.shape))
        key_logits(model, torch.randint(0, 2 * V, (2, 2 * V - 3)))
        assert seen == [torch.Size([2, 2 * V - 3, 16])]


class TestSideBySide:
    """Training together reproduces training alone."""

    def test_losses_weights_and_metrics_match_the_one_at_a_time_runs(self, trained):
        together, alone = trained
        for t, a in zip(together, alone, strict=True):
            assert t.log["step"].to_list() == a.log["step"].to_list()
            for col in ("train_loss", "grad_norm", "lr"):
                torch.testing.assert_close(
                    t.log[col].fill_nan(0.0).to_torch(), a.log[col].fill_nan(0.0).to_torch(), atol=LOSS_ATOL, rtol=0
                )
            for col in ("mae_bits", "kl_bits", "mass_eliminated"):
                torch.testing.assert_close(t.log[col].to_torch(), a.log[col].to_torch(), atol=MAE_ATOL, rtol=0)
            for name, w in weights(a).items():
                torch.testing.assert_close(weights(t)[name], w, atol=WEIGHT_ATOL, rtol=0, msg=f"{t.name} {name}")

    def test_logged_metrics_are_evaluate_of_the_returned_weights(self, trained):
        """Evaluation stays the single path's: the last log row is exactly ``evaluate`` of the weights returned."""
        together, _ = trained
        for r, spec in zip(together, RUNS, strict=True):
            metrics = evaluate(r.model, eval_batch(V, spec.cfg))
            assert {k: r.log[k][-1] for k in metrics} == metrics

    def test_a_run_with_huge_gradients_leaves_the_others_alone(self, tmp_path):
        """Clipping and AdamW are each run's own: beside a run whose gradients are clipped hard (lr 3 makes them
        ~10x the clip), two runs end bit for bit where they end alone."""
        wild = RunSpec("wild", TF, replace(CFG, lr=3.0), 7)
        pair = [RUNS[0], RUNS[1]]
        together = train_runs(V, [pair[0], wild, pair[1]], tmp_path / "with", progress=False)
        assert together[1].log["grad_norm"].max() > 5 * CFG.grad_clip  # the wild run's gradients were clipped
        for r, t in zip(pair, (together[0], together[2]), strict=True):
            alone = train_runs(V, [r], tmp_path / f"alone-{r.name}", progress=False)[0]
            assert all(torch.equal(w, weights(t)[n]) for n, w in weights(alone).items())
            assert alone.log.drop("train_s").equals(t.log.drop("train_s"))

    def test_runs_are_cached_where_train_run_caches_them(self, tmp_path):
        """Same folder and key as one at a time: either path finds the other's finished runs."""
        first = train_runs(V, RUNS[:2], tmp_path, progress=False)
        assert not any(r.cached for r in first)
        again = train_run(RUNS[0].name, V, TF, CFG, 0, tmp_path, progress=False)
        assert again.cached and again.folder == first[0].folder and again.train_time_s == first[0].train_time_s
        both = train_runs(V, RUNS[:2], tmp_path, progress=False)
        assert all(r.cached for r in both)

    def test_a_failing_run_stops_the_others_and_raises(self, tmp_path, monkeypatch):
        """The first real error surfaces; the runs beside it stop and publish nothing."""
        monkeypatch.setenv(ensemble.TEST_FAIL, RUNS[3].name)  # RUNS[3] raises in its first step
        long = replace(CFG, steps=2000)
        with pytest.raises(ValueError, match="boom"):
            train_runs(V, [RunSpec("a", TF, long, 0), RUNS[3], RunSpec("b", TF, long, 1)], tmp_path, progress=False)
        assert not list(tmp_path.iterdir())


def test_bench_runs_on_smoke_and_the_paths_agree():
    """``lab bench wind`` on smoke: both paths time, and measure() checks their final MAEs agree (else it raises)."""
    m = measure(get_profile("smoke"), repeats=1)
    assert m.workload == "wind" and len(m.baseline_s) == len(m.fast_s) == 1


def test_a_plain_script_without_a_main_guard_can_train_side_by_side(tmp_path):
    """multiprocessing imports ``__main__`` again in its forkserver and workers; train_runs hides it, so a script
    that calls it at top level (no ``if __name__ == "__main__":``) trains once instead of re-running itself."""
    import subprocess
    import sys

    script = tmp_path / "plain.py"
    script.write_text(
        "import sys\n"
        "from pathlib import Path\n"
        "from lab.train.ensemble import RunSpec, train_runs\n"
        "from lab.models.windtunnel import ModelSpec\n"
        "from lab.train.windtunnel import TrainConfig\n"
        "cfg = TrainConfig(steps=5, batch_size=8, lr=3e-3, warmup=1, eval_every=5, eval_sequences=16)\n"
        "spec = ModelSpec('transformer', n_layer=1, n_head=2, d_model=16)\n"
        "runs = [RunSpec(f'r{s}', spec, cfg, s) for s in (0, 1)]\n"
        "out = train_runs(6, runs, Path(sys.argv[1]), progress=False)\n"
        "print('trained', len(out), 'runs')\n"
    )
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "runs")], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("trained 2 runs") == 1  # the script body ran once, in this process only


class TestPrecision:
    def test_bf16_training_follows_the_fp32_run_and_evaluates_in_fp32(self, tmp_path):
        # bf16 autocast changes the forward's rounding, not the recipe: the first step's loss is the fp32 one to
        # bf16 precision (8 bits of mantissa), and every logged metric is evaluate() of the returned weights
        torch.set_num_threads(1)
        fp32 = train_run("p", V, TF, replace(CFG, steps=10), 0, tmp_path / "a", progress=False)
        bf16 = train_run("p", V, TF, replace(CFG, steps=10, precision="bf16"), 0, tmp_path / "b", progress=False)
        assert bf16.log["train_loss"][1] == pytest.approx(fp32.log["train_loss"][1], rel=2e-2)
        assert bf16.log["train_loss"][1] != fp32.log["train_loss"][1]  # the autocast did take effect
        ev = evaluate(bf16.model, eval_batch(V, CFG))
        assert bf16.log["mae_bits"][-1] == ev["mae_bits"]

    def test_an_unknown_precision_is_one_clear_error(self):
        from lab.errors import LabError

        with pytest.raises(LabError, match="precision must be one of fp32, bf16"):
            replace(CFG, precision="fp16")
        with pytest.raises(LabError, match="compile must be True or False"):
            replace(CFG, compile="yes")
