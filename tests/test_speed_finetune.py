"""Fast paths of fine-tuning and scoring (lab.train.precision, lab.train.evaluation) against the fp32 / one-at-a-time
paths they replace, on the tiny random Llama."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from lab.data.constraints import (
    continuation_logprob,
    encode_texts,
    held_out_prompts,
    mean_token_loss,
    score_prompts,
)
from lab.data.records import PROBES, chat_text, make_task
from lab.errors import LabError
from lab.models.loading import load_tiny_model
from lab.profiles import get_profile
from lab.tracks.A_finetuning.config import config_for
from lab.train.evaluation import (
    answer_all,
    continuation_logprobs,
    greedy_answers,
    greedy_tokens,
    labelled_token_loss,
    probe_retention,
    task_success,
)
from lab.train.lora import FinetuneConfig, collate, encode_examples, train_lora
from lab.train.precision import labelled_positions

SMOKE = config_for(get_profile("smoke"))
# Tolerances of the bf16 training step against the fp32 one on the smoke recipe (8 steps; observed: train loss
# 2e-4, eval loss 2e-5, grad norm 0.2 % apart).
TRAIN_LOSS_ATOL = 2e-3  # nats per answer token, every step
EVAL_LOSS_ATOL = 5e-4  # the eval losses are fp32 on both paths: only the LoRA weights differ
GRAD_NORM_RTOL = 1e-2


# ------------------------------------------------------------------------------------------- the config field


class TestPrecisionField:
    """``FinetuneConfig.precision`` selects the training step's number format."""

    def test_default_is_the_fast_path(self):
        assert FinetuneConfig().precision == "bf16" and SMOKE.precision == "bf16"

    @pytest.mark.parametrize("bad", ["fp16", "BF16", "", None, 16])
    def test_bad_values_are_a_lab_error(self, bad):
        with pytest.raises(LabError) as err:
            FinetuneConfig(precision=bad)
        assert str(err.value) == (
            f"bad fine-tuning config: precision must be one of 'bf16', 'fp32' (got {bad!r}): "
            f'"fp32" is the slower reference path'
        )


# ------------------------------------------------------------------------------------------- the training step


def _curves(tmp_path, cfg: FinetuneConfig):
    res = train_lora(load_tiny_model("llama"), cfg, tmp_path / cfg.precision, progress=False, save=False)
    steps, evals, _ = res.log.frames()
    return res, steps, evals


class TestBf16Step:
    """The bf16 step (autocast, eager attention, labelled logits) tracks the fp32 step; evaluations stay fp32."""

    @pytest.mark.parametrize("quant", ["none", "nf4"])
    def test_loss_curves_within_tolerance(self, tmp_path, quant):
        cfg = replace(SMOKE, quant=quant)
        _, ref_steps, ref_evals = _curves(tmp_path / "ref", replace(cfg, precision="fp32"))
        res, steps, evals = _curves(tmp_path / "fast", cfg)
        assert steps["loss"].to_list() == pytest.approx(ref_steps["loss"].to_list(), abs=TRAIN_LOSS_ATOL)
        assert steps["grad_norm"].to_list() == pytest.approx(ref_steps["grad_norm"].to_list(), rel=GRAD_NORM_RTOL)
        assert evals["eval_loss"].to_list() == pytest.approx(ref_evals["eval_loss"].to_list(), abs=EVAL_LOSS_ATOL)
        assert (steps["loss"] != ref_steps["loss"]).any()  # autocast did run: not the fp32 numbers themselves
        assert res.model.config._attn_implementation == "sdpa"  # the model's own attention is back

    def test_eval_is_fp32(self, tmp_path):
        # Before the first step both runs evaluate the same model (LoRA B = 0): the eval losses agree to fp32
        # rounding (eager vs sdpa attention), far inside what a bf16 forward would move them (~1e-3).
        _, _, ref = _curves(tmp_path / "ref", replace(SMOKE, precision="fp32", epochs=1))
        _, _, fast = _curves(tmp_path / "fast", replace(SMOKE, epochs=1))
        assert fast["eval_loss"][0] == pytest.approx(ref["eval_loss"][0], abs=1e-6)

    def test_labelled_positions_give_the_full_loss(self):
        lm = load_tiny_model("llama")
        data = make_task(8, 2, seed=1)
        batch = collate(0)(encode_examples(lm.tokenizer, data.train[:4]))
        with torch.no_grad():
            full = lm.model(**batch).loss
            kept = labelled_positions(batch)
            fewer = lm.model(**kept)
        assert 0 < kept["logits_to_keep"].numel() < batch["input_ids"].shape[1]  # positions were dropped
        assert fewer.logits.shape[1] == kept["logits_to_keep"].numel()
        torch.testing.assert_close(fewer.loss, full, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------- decoding and scoring


def _argmax_loop(model, ids: list[int], limit: int, end: int | None) -> list[int]:
    """Greedy decoding the slow, obvious way: the whole sequence through the model for every new token."""
    seq, out = list(ids), []
    with torch.no_grad():
        while len(out) < limit:
            t = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            if t == end:
                break
            out.append(t)
            seq.append(t)
    return out


# Tiny random models whose greedy answers vary (the tiny Llama repeats one token), two with sliding-window layers.
VARIED = ("mistral", "phi3", "gemma2", "gemma3")


class TestDecoding:
    """Batched greedy decoding with the KV cache and finished rows leaving the batch, against one prompt at a time."""

    @pytest.mark.parametrize("arch", VARIED)
    def test_greedy_tokens_match_one_prompt_argmax_loop(self, arch):
        lm = load_tiny_model(arch)
        tok = lm.tokenizer
        texts = ["Hi", "Log this event: Ann moved to Rome in 1999.", "Note: a long sentence about Kyoto and Lima.", "x"]
        prompts = [tok(chat_text(tok, t), add_special_tokens=False)["input_ids"] for t in texts]
        limits = [12, 5, 9, 1]  # rows leave the batch at their own limits
        # An end token the model does emit: the first new token after the start of the first prompt's free-running
        # answer, so that row stops at it.
        free = _argmax_loop(lm.model, prompts[0], limits[0], None)
        stop = next(k for k in range(1, len(free)) if free[k] not in free[:k])
        truth = [_argmax_loop(lm.model, p, n, free[stop]) for p, n in zip(prompts, limits, strict=True)]
        assert truth[0] == free[:stop]  # that row ends early, at the end token
        for batch_size in (1, 3, 64):
            got = greedy_tokens(lm.model, prompts, limits, free[stop], pad=0, batch_size=batch_size)
            assert got == truth, batch_size

    @pytest.mark.parametrize("arch", ["llama", "phi3"])
    def test_answers_match_the_reference_generate_path(self, arch):
        lm = load_tiny_model(arch)
        test = make_task(4, 5, seed=2).test
        fast_tasks, fast_probes = answer_all(lm.model, lm.tokenizer, test, 12, PROBES[:4])
        ref_tasks = task_success(lm.model, lm.tokenizer, test, 12, reference=True)
        ref_probes = probe_retention(lm.model, lm.tokenizer, PROBES[:4], reference=True)
        assert fast_tasks.equals(ref_tasks) and fast_probes.equals(ref_probes)
        prompts = [ex.prompt for ex in test]
        assert greedy_answers(lm.model, lm.tokenizer, prompts, 7, batch_size=2) == greedy_answers(
            lm.model, lm.tokenizer, prompts, 7, reference=True
        )

    def test_lora_model_decodes_merged_with_the_same_answers(self):
        from lab.train.lora import attach_lora

        lm = load_tiny_model("mistral")
        model = attach_lora(lm.model, replace(SMOKE, rank=4))
        gen = torch.Generator().manual_seed(3)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # a trained-looking adapter: it changes the answers
                p.data = torch.randn(p.shape, generator=gen) * 0.3
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        prompts = [ex.prompt for ex in make_task(4, 6, seed=5).test]
        got = greedy_answers(model, lm.tokenizer, prompts, 10)
        assert got == greedy_answers(model, lm.tokenizer, prompts, 10, reference=True)
        with model.disable_adapter():
            assert got != greedy_answers(model, lm.tokenizer, prompts, 10, reference=True)  # the adapter mattered
        for n, p in model.named_parameters():  # the caller's model is untouched (the merge was on a copy)
            assert torch.equal(p, before[n]), n

    def test_reference_path_takes_one_limit(self):
        lm = load_tiny_model("llama")
        with pytest.raises(LabError, match="one max_new_tokens"):
            greedy_answers(lm.model, lm.tokenizer, ["a", "b"], [3, 4], reference=True)

    @pytest.mark.parametrize("arch", ["llama", "gemma3"])
    def test_continuation_logprobs_match_one_at_a_time(self, arch):
        lm = load_tiny_model(arch)
        scored = held_out_prompts()[::7]
        prompts = [p.prompt for p in scored]
        continuations = [[" " + c for c in (p.target, *p.alternatives)] for p in scored]
        lengths = {len(lm.tokenizer(c, add_special_tokens=False)["input_ids"]) for cs in continuations for c in cs}
        assert len(lengths) > 1 and max(lengths) > 1  # multi-token continuations of different lengths
        got = continuation_logprobs(lm.model, lm.tokenizer, prompts, continuations, batch_size=3)
        truth = [
            [continuation_logprob(lm.model, lm.tokenizer, p, c) for c in cs]
            for p, cs in zip(prompts, continuations, strict=True)
        ]
        for g, t in zip(got, truth, strict=True):
            assert g == pytest.approx(t, rel=1e-5, abs=1e-5)

    def test_score_prompts_batched_equals_one_at_a_time(self):
        """E's scoring: the batched path picks the same winners with the same margins as the one-at-a-time one."""
        lm = load_tiny_model("llama")
        prompts = held_out_prompts()[::5]
        fast = score_prompts(lm.model, lm.tokenizer, prompts)
        slow = score_prompts(lm.model, lm.tokenizer, prompts, batched=False)
        assert fast["correct"].to_list() == slow["correct"].to_list()
        assert fast["margin"].to_list() == pytest.approx(slow["margin"].to_list(), abs=1e-4)

    def test_labelled_token_loss_matches_mean_token_loss(self):
        lm = load_tiny_model("llama")
        rows = encode_texts(lm.tokenizer, ["Priya was blarf all day. Priya felt happy.", "Tom sat zib the box."])
        rows += encode_texts(lm.tokenizer, ["A much longer text, so that the batch is padded on the right side."])
        assert labelled_token_loss(lm.model, rows, batch_size=2) == pytest.approx(
            mean_token_loss(lm.model, rows), rel=1e-6
        )


# ------------------------------------------------------------------------------------------- the benchmarks


@pytest.mark.parametrize("workload", ["lora", "generation"])
def test_bench_runs_on_smoke_and_paths_agree(workload):
    """``measure`` on smoke runs, and passes its own check that the two paths' losses / answers and log-probs agree
    (it raises a LabError when they do not)."""
    import importlib

    importlib.import_module(f"lab.bench.{workload}").measure(get_profile("smoke"), repeats=5)
