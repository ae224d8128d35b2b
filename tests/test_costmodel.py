"""The cost model (lab/bench/costmodel.py): its fit, its weight term and its projection, against independent truths."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict

import numpy as np
import polars as pl
import pytest
import torch

from lab.bench import costmodel as cm

# ------------------------------------------------------------------------------------------------- fixtures

SHAPES = (
    cm.Shape("a", 64, 2, 192, 512, 2, 1),
    cm.Shape("b", 128, 3, 512, 1024, 4, 2),
    cm.Shape("c", 128, 6, 256, 4096, 4, 4),
    cm.Shape("d", 192, 4, 1024, 2048, 3, 1),
    cm.Shape("e", 256, 2, 384, 8192, 4, 2),
)
TRUTH = {  # (workload, quantity) -> the coefficients the synthetic data are made with
    ("train", "time_s"): {"flops": 2e-11, "layers": 3e-3, "call": 1e-2},
    ("train", "memory_bytes"): {"act_d": 6.0, "act_ff": 4.0, "logits": 3.0, "runtime": 5e6},
    ("forward", "time_s"): {"flops": 1e-11, "layers": 1e-3, "call": 4e-3},
    ("forward", "memory_bytes"): {"act_d": 2.0, "act_ff": 1.5, "logits": 1.2, "runtime": 2e6},
    ("decode", "time_s"): {"flops": 5e-11, "weight_bytes": 1e-10, "layers": 5e-4, "call": 1e-3},
}


def _synthetic(precision: str) -> pl.DataFrame:
    """Rows whose time and memory are exactly the model with TRUTH's coefficients."""
    rows = []
    for shape, (b, t), workload in itertools.product(
        SHAPES, ((1, 16), (2, 64), (8, 32)), ("train", "forward", "decode")
    ):
        for rank in (4, 32) if workload == "train" else (0,):
            row = {**asdict(shape), "precision": precision, "workload": workload, "batch": b, "seq": t}
            row |= {"rank": rank, "held_out": False, "time_s": None, "memory_bytes": None}
            timing, memory, known = cm.features(row)
            row["time_s"] = sum(TRUTH[(workload, "time_s")][k] * v for k, v in timing.items())
            if memory:
                row["memory_bytes"] = known + sum(TRUTH[(workload, "memory_bytes")][k] * v for k, v in memory.items())
            rows.append(row)
    return pl.DataFrame(rows)


# ------------------------------------------------------------------------------------------------- tests


class TestFit:
    @pytest.mark.parametrize("precision", ["fp32", "bf16", "nf4"])
    def test_recovers_known_coefficients(self, precision):
        """Noise-free data made with known coefficients give those coefficients back (to rounding)."""
        coefs = cm.fit(_synthetic(precision))
        for (workload, quantity), terms in TRUTH.items():
            got = coefs.filter((pl.col("workload") == workload) & (pl.col("quantity") == quantity))
            assert dict(zip(got["term"], got["coefficient"], strict=True)) == pytest.approx(terms, rel=1e-8)
            assert got["fit_mean_rel_error"].max() < 1e-9

    def test_nnls_drops_a_negative_term(self):
        """A term that least squares would give a negative weight is set to zero, the rest refitted."""
        X = np.array([[1.0, 1.0], [2.0, 1.0], [3.0, 1.0], [4.0, 1.0]])
        y = 2.0 * X[:, 0] - 1.0  # the intercept is negative: the non-negative fit is the slope alone
        coef = cm.nnls(X, y)
        assert coef[1] == 0.0 and coef[0] == pytest.approx((X[:, 0] @ y) / (X[:, 0] @ X[:, 0]))


class TestWeights:
    @pytest.mark.parametrize("precision", ["fp32", "bf16"])
    def test_weight_term_is_the_models_bytes(self, precision):
        """The weight term equals the bytes of every parameter of a tiny Llama of the shape."""
        from transformers import AutoModelForCausalLM

        shape = cm.Shape("tiny", 128, 3, 384, 1024, 4, 2)
        model = AutoModelForCausalLM.from_config(shape.llama_config())
        model = model.to(torch.bfloat16 if precision == "bf16" else torch.float32)
        assert shape.params == sum(p.numel() for p in model.parameters())
        assert cm.weight_bytes(shape, precision) == sum(p.numel() * p.element_size() for p in model.parameters())

    def test_untied_with_biases(self):
        """Qwen2's q/k/v biases and an untied LM head are counted (a tiny Qwen2 from its config)."""
        from transformers import AutoModelForCausalLM, Qwen2Config

        config = Qwen2Config(
            hidden_size=128,
            num_hidden_layers=2,
            intermediate_size=320,
            vocab_size=1000,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
        model = AutoModelForCausalLM.from_config(config)
        assert cm.Shape.of(config, "qwen").params == sum(p.numel() for p in model.parameters())

    def test_nf4_term_is_the_quantised_models_bytes(self):
        """In nf4 the weight term equals the packed 4-bit weights + fp32 absmax of bitsandbytes' Linear4bit layers
        plus the fp32 rest of the model (what the lab's QLoRA path builds)."""
        from transformers import AutoModelForCausalLM

        from lab.models.loading import LoadedModel
        from lab.train.lora import quantize_nf4

        shape = cm.Shape("tiny", 128, 2, 384, 1024, 4, 2)
        model = AutoModelForCausalLM.from_config(shape.llama_config())
        q = quantize_nf4(LoadedModel(model, None, "tiny", "llama")).model
        total = 0
        for p in q.parameters():  # each tensor once (the LM head is the embedding)
            total += p.numel() * p.element_size()
            state = getattr(p, "quant_state", None)
            if state is not None:
                total += state.absmax.numel() * state.absmax.element_size()
        assert sum(getattr(p, "quant_state", None) is not None for p in q.parameters()) == 7 * shape.n_layers
        assert total == cm.weight_bytes(shape, "nf4")


class TestProjection:
    def test_matches_a_hand_calculation(self):
        """Qwen2.5-7B, QLoRA r16, batch 4 x 160 tokens, stated activation constants and card: every term by hand."""
        coefs = {"act_d": 2.0, "act_ff": 3.0, "logits": 1.5, "runtime": 123.0}  # runtime: the CPU's, not used
        card = cm.Card(achieved_flops=10e12, context_bytes=0.5e9, fragmentation=0.1, memory_bytes=16e9)
        got = cm.project(coefs, cm.Scenario("hand", "train", 4, 160, rank=16), card=card)
        # one decoder layer's linears: q, o 3584x3584; k, v 3584x512; gate, up, down 3584x18944
        layer = 2 * 3584 * 3584 + 2 * 3584 * 512 + 3 * 3584 * 18944
        assert layer == 233_046_016
        linear = 28 * layer  # 6,525,288,448
        rest = 2 * 152064 * 3584 + 28 * (2 * 3584 + 3584 + 512 + 512) + 3584  # embed + head, norms, q/k/v biases
        weights = linear * (0.5 + 4 / 64) + rest * 2  # nf4 + fp32 absmax per 64; the rest in bf16
        dequant = 3584 * 18944 * 2  # the largest linear, dequantised to bf16
        lora = 28 * 16 * ((3584 + 3584) * 2 + (3584 + 512) * 2 + (3584 + 18944) * 3)  # r (in + out), every linear
        activations = 28 * 4 * 160 * (2.0 * 3584 + 3.0 * 18944) * 2
        logits = 1.5 * 4 * 160 * 152064 * 4
        allocated = weights + dequant + 16 * lora + activations + logits
        total = allocated * 1.1 + 0.5e9
        assert got["weights_gb"] == pytest.approx(5_851_130_880 / 1e9, rel=1e-12)
        assert got["weights_gb"] * 1e9 == pytest.approx(weights, rel=1e-12)
        assert got["lora_states_gb"] * 1e9 == pytest.approx(16 * lora, rel=1e-12)
        assert got["activations_gb"] * 1e9 == pytest.approx(activations, rel=1e-12)
        assert got["logits_gb"] * 1e9 == pytest.approx(logits, rel=1e-12)
        assert got["total_gb"] * 1e9 == pytest.approx(total, rel=1e-12)
        assert got["fits"] == (total <= 16e9)
        # FLOPs per token: 4 x matmul weights (incl. the 152064 x 3584 head) + 3 x causal attention + 3 x 2 x LoRA
        flops = 4 * (linear + 152064 * 3584) + 3 * 2 * 28 * 160 * 3584 + 3 * 2 * lora
        assert got["flops_per_token"] == pytest.approx(flops, rel=1e-12)
        assert got["call_s"] == pytest.approx(flops * 4 * 160 / 10e12, rel=1e-12)


def test_smoke_run_measures_what_it_must_hold(results_dir):
    """On smoke, every fp32 forward's measured peak holds at least its fp32 logits tensor, and each validation row is
    the fitted model's prediction for a held-out measurement."""
    from lab.bench import cost_report
    from lab.paths import results_root
    from lab.profiles import get_profile

    out = cost_report.run(get_profile("smoke"))  # `lab bench cost`: publishes what it returns
    for name, frame in out.items():
        assert pl.read_parquet(results_root("smoke") / "bench" / f"{name}.parquet").equals(frame)
    chart = json.loads((results_root("smoke") / "bench" / "cost_validation.vl.json").read_text())
    drawn = sum(len(rows) for rows in chart["datasets"].values() if rows and "rel_error" in rows[0])
    assert drawn == out["cost_validation"].height  # every held-out point is on the chart
    m = out["cost_measurements"]
    fwd = m.filter((pl.col("workload") == "forward") & (pl.col("precision") == "fp32"))
    assert fwd.height and (fwd["memory_bytes"] >= fwd["batch"] * fwd["seq"] * fwd["vocab"] * 4).all()
    held = m.filter(pl.col("held_out") & (pl.col("workload") != "decode"))
    val = out["cost_validation"].filter(pl.col("quantity") == "memory_bytes")
    assert val.height == held.height
    for r, v in zip(held.to_dicts(), val.to_dicts(), strict=True):
        assert v["measured"] == r["memory_bytes"]
        assert v["predicted"] == pytest.approx(cm.predict(out["cost_fit"], r, "memory_bytes"))
