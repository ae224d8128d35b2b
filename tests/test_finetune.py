"""Fine-tuning (lab.train.lora, lab.data.records, Track A): LoRA/QLoRA mechanics checked against independent
computations."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
import torch

from lab.data.records import (
    CITIES,
    N_TRAIN_CITIES,
    N_TRAIN_NAMES,
    NAMES,
    answer_for,
    chat_text,
    encode_example,
    end_token_id,
    field_scores,
    make_task,
    score_answer,
    wilson_interval,
)
from lab.errors import LabError
from lab.models.loading import load_tiny_model
from lab.paths import data_dir
from lab.profiles import get_profile
from lab.tracks.A_finetuning.config import config_for, final_adapter_dir
from lab.train.callbacks import moment_stats
from lab.train.evaluation import greedy_answers, perplexity
from lab.train.lora import (
    ALL_LINEAR,
    FinetuneConfig,
    attach_lora,
    collate,
    encode_examples,
    load_adapter,
    quantize_nf4,
    save_adapter,
    schedule_steps,
    train_lora,
)

SMOKE = config_for(get_profile("smoke"))


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(tok, text: str = "User: Log this event: Maria moved to Lisbon in 2019.") -> torch.Tensor:
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


class TestTaskData:
    """The generated task and its deterministic scoring."""

    def test_seeded_and_test_entities_unseen_in_training(self):
        a, b = make_task(50, 20, seed=3), make_task(50, 20, seed=3)
        assert a == b and a != make_task(50, 20, seed=4)
        train_names = {e.who for e in a.train} | {e.where for e in a.train}
        test_names = {e.who for e in a.test} | {e.where for e in a.test}
        assert train_names <= set(NAMES[:N_TRAIN_NAMES]) | set(CITIES[:N_TRAIN_CITIES])
        assert not train_names & test_names
        for ex in a.train + a.test:  # every answer is recoverable from its own sentence
            assert ex.who in ex.prompt and ex.where in ex.prompt and str(ex.year) in ex.prompt
            assert json.loads(ex.answer) == ex.fields

    @pytest.mark.parametrize(
        "text, expected",
        [
            ('{"who": "Ann", "where": "Rome", "year": 1999}', (True, True)),
            ('  {"year": 1999, "where": "Rome", "who": "Ann"}\n', (True, True)),  # key order and whitespace are free
            ('{"who": "Ann", "where": "Paris", "year": 1999}', (True, False)),
            ('{"who": "Ann", "where": "Rome", "year": "1999"}', (False, False)),  # year must be an integer
            ('{"who": "Ann", "where": "Rome", "year": true}', (False, False)),
            ('{"who": "Ann", "where": "Rome"}', (False, False)),
            ('{"who": "Ann", "where": "Rome", "year": 1999, "note": ""}', (False, False)),
            ('```json\n{"who": "Ann", "where": "Rome", "year": 1999}\n```', (False, False)),
            ('{"who": "Ann", "where": "Rome", "year": 1999} Done!', (False, False)),
            ("Ann moved to Rome in 1999.", (False, False)),
            ('["Ann", "Rome", 1999]', (False, False)),
        ],
    )
    def test_score_answer(self, text, expected):
        assert score_answer(text, {"who": "Ann", "where": "Rome", "year": 1999}) == expected

    @pytest.mark.parametrize(
        "text, expected",
        [
            ('{"who": "Ann", "where": "Rome", "year": 1999}', (True, True, True)),
            ('{"who": "Anne", "where": "R Rome", "year": 1999}', (False, False, True)),
            ('{"year": 1998, "where": "Rome", "who": "Ann"}', (True, True, False)),
            ('{"who": "Ann", "where": "Rome", "year": "1999"}', (False, False, False)),  # malformed: nothing counts
            ("Ann moved to Rome in 1999.", (False, False, False)),
        ],
    )
    def test_field_scores(self, text, expected):
        fields = {"who": "Ann", "where": "Rome", "year": 1999}
        scores = field_scores(text, fields)
        assert tuple(scores[k] for k in ("who", "where", "year")) == expected
        assert all(scores.values()) == score_answer(text, fields)[1]  # exact success is all three fields right

    @pytest.mark.parametrize("k, n", [(0, 30), (3, 30), (15, 30), (29, 30), (30, 30), (1, 7)])
    def test_wilson_interval_brute_force(self, k, n):
        # The Wilson interval is the set of p whose score test does not reject: |k - n p| <= z sqrt(n p (1-p)).
        z = 1.959964
        grid = [i / 200_000 for i in range(200_001)]
        inside = [p for p in grid if (k - n * p) ** 2 <= z * z * n * p * (1 - p)]
        lo, hi = wilson_interval(k, n)
        assert lo == pytest.approx(min(inside), abs=1e-5) and hi == pytest.approx(max(inside), abs=1e-5)

    def test_loss_mask_covers_exactly_the_answer(self):
        tok = load_tiny_model("llama").tokenizer
        ex = make_task(1, 0).train[0]
        row = encode_example(tok, ex)
        supervised = [t for t, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100]
        assert supervised == [lab for lab in row["labels"] if lab != -100]
        assert supervised[-1] == end_token_id(tok)
        assert tok.decode(supervised[:-1]) == ex.answer
        prompt_len = len(tok(chat_text(tok, ex.prompt), add_special_tokens=False)["input_ids"])
        assert row["labels"][:prompt_len] == [-100] * prompt_len


class TestValidation:
    """Bad hyper-parameters: one LabError before any compute."""

    @pytest.mark.parametrize(
        "change, match",
        [
            (dict(lr=0.0), "lr must be a finite number > 0"),
            (dict(lr=-1e-4), "lr must be a finite number > 0"),
            (dict(rank=0), "rank must be an integer >= 1"),
            (dict(target_modules=("q_proj", "qkv")), r"unknown target module\(s\) \['qkv'\]"),
            (dict(n_train=0), r"n_train must be an integer >= 1 \(got 0\)"),
            (dict(n_test=0), r"n_test must be an integer >= 1 \(got 0\): the held-out examples score the run"),
            (dict(max_seq_len=1000), "longer than the model allows"),
            (dict(max_seq_len=20), "more than max_seq_len 20"),
        ],
    )
    def test_bad_config_raises_before_compute(self, change, match, tmp_path, monkeypatch):
        import lab.train.lora

        def no_compute(*a, **k):
            raise AssertionError("compute started before validation")

        monkeypatch.setattr(lab.train.lora, "attach_lora", no_compute)
        monkeypatch.setattr(lab.train.lora, "quantize_nf4", no_compute)
        with pytest.raises(LabError, match=match):
            train_lora(load_tiny_model("llama"), replace(SMOKE, **change), tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()

    @pytest.mark.parametrize(
        "change, match",
        [
            (
                dict(lr=0.0),
                r"bad fine-tuning config: lr must be a finite number > 0 \(got 0.0\); LoRA fine-tunes typically use",
            ),
            (dict(lr=float("inf")), r"lr must be a finite number > 0 \(got inf\)"),
            (dict(lr=float("nan")), r"lr must be a finite number > 0 \(got nan\)"),
            (dict(rank=1.5), r"rank must be an integer >= 1 \(got 1.5\); try 8"),
            (dict(alpha_per_rank=0.0), r"alpha_per_rank must be a finite number > 0 \(got 0.0\)"),
            (dict(batch_size=0), r"batch_size must be an integer >= 1 \(got 0\)"),
            (dict(epochs=0), r"epochs must be an integer >= 1 \(got 0\)"),
            (dict(max_seq_len=0), r"max_seq_len must be an integer >= 1 \(got 0\)"),
            (dict(dropout=2.0), r"dropout must be in \[0, 1\) \(got 2.0\)"),
            (dict(warmup_ratio=-1.0), r"warmup_ratio must be in \[0, 1\] \(got -1.0\)"),
            (
                dict(scheduler="cosine_annealing"),
                r"scheduler must be one of 'linear', 'cosine', .* \(got 'cosine_annealing'\)",
            ),
            (dict(weight_decay=-0.1), r"weight_decay must be a finite number >= 0 \(got -0.1\)"),
            (dict(max_grad_norm=-1.0), r"max_grad_norm must be a finite number > 0 \(got -1.0\): the step log records"),
            (dict(max_grad_norm=0.0), r"max_grad_norm must be a finite number > 0 \(got 0.0\)"),
            (
                dict(n_test=0),
                r"n_test must be .* \(to train without evaluation, call train_lora\(..., do_eval=False\)\)",
            ),
            (dict(n_evals=-1), r"n_evals must be an integer >= 0 \(got -1\)"),
            (dict(quant="int4"), r"quant must be one of 'none', 'nf4' \(got 'int4'\)"),
            (dict(target_modules=()), r"target_modules is empty: name the linear layers to adapt"),
        ],
    )
    def test_config_checks_itself_without_a_model(self, change, match):
        with pytest.raises(LabError, match=match):
            FinetuneConfig(**change)

    def test_schedulers_are_transformers_own(self):
        """Every scheduler the config accepts is one of transformers' names and builds without extra settings."""
        from transformers import get_scheduler
        from transformers.trainer_utils import SchedulerType

        from lab.train.lora import SCHEDULERS

        assert set(SCHEDULERS) < {s.value for s in SchedulerType}
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        for name in SCHEDULERS:
            get_scheduler(name, opt, num_warmup_steps=1, num_training_steps=10)
            assert FinetuneConfig(scheduler=name).scheduler == name

    def test_rows_without_held_out_examples_need_do_eval_off(self, tmp_path):
        rows = [{"input_ids": [1, 5, 6, 2], "labels": [1, 5, 6, 2]}] * 4
        with pytest.raises(LabError, match=r"no held-out rows to evaluate on: .* do_eval=False"):
            train_lora(load_tiny_model("llama"), SMOKE, tmp_path / "run", rows=(rows, []), progress=False)

    def test_all_problems_in_one_error(self, tmp_path):
        with pytest.raises(LabError) as err:
            train_lora(load_tiny_model("llama"), replace(SMOKE, lr=0.0, rank=-2), tmp_path / "run", progress=False)
        assert "lr must be" in str(err.value) and "rank must be" in str(err.value)


class TestLora:
    """Adapters against the base model's own outputs."""

    @pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
    def test_adapter_at_init_leaves_logits_unchanged(self, arch):
        base = load_tiny_model(arch).model
        ids = _ids(load_tiny_model(arch).tokenizer)
        expected = _logits(base, ids)  # the base model's own output, before any adapter exists
        peft_model = attach_lora(base, replace(SMOKE, rank=8))
        assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) > 0
        assert torch.equal(_logits(peft_model, ids), expected)
        with peft_model.disable_adapter():
            assert torch.equal(_logits(peft_model, ids), expected)

    def test_trainable_parameter_count(self):
        lm = load_tiny_model("llama")
        model = attach_lora(lm.model, replace(SMOKE, rank=4))
        # r * (d_in + d_out) per adapted linear layer, counted from the base model's own shapes
        expected = sum(
            4 * (m.in_features + m.out_features)
            for n, m in load_tiny_model("llama").model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in ALL_LINEAR
        )
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected

    def test_saved_adapter_reproduces_logits_exactly(self, tmp_path):
        lm = load_tiny_model("llama")
        res = train_lora(lm, replace(SMOKE, n_evals=1), tmp_path / "run", progress=False)
        ids = _ids(lm.tokenizer)
        trained = _logits(res.model, ids)
        assert not torch.equal(trained, _logits(load_tiny_model("llama").model, ids))  # training changed the model
        folder = save_adapter(res.model, tmp_path / "adapter")
        assert (folder / "adapter_model.safetensors").exists()
        reloaded = load_adapter(load_tiny_model("llama"), folder)
        assert torch.equal(_logits(reloaded, ids), trained)

    def test_missing_adapter_names_the_fix(self, tmp_path):
        with pytest.raises(LabError, match=r"adapter_config.json is missing.*save_adapter.*`lab run <track>`"):
            load_adapter(load_tiny_model("llama"), tmp_path)

    def test_final_adapter_dir(self):
        assert final_adapter_dir(get_profile("smoke")) == data_dir() / "adapters" / "smoke" / "A_finetuning" / "main"

    def test_save_adapter_replaces_the_old_one_atomically(self, tmp_path):
        lm = load_tiny_model("llama")
        model = attach_lora(lm.model, SMOKE)
        folder = tmp_path / "adapter"
        folder.mkdir()
        (folder / "stale.txt").write_text("from an older run")
        assert save_adapter(model, folder) == folder
        assert sorted(p.name for p in folder.iterdir()) == [
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temporary sibling left behind


class TestTraining:
    """What Trainer logs and saves, checked against a hand-written step and an uninterrupted run."""

    def test_first_step_matches_a_manual_step(self, tmp_path):
        # One batch holding every training example, so the first step's batch is known regardless of shuffling; the
        # fp32 path, whose step is the hand-written fp32 one (the bf16 path is checked against fp32 in
        # tests/test_speed_finetune.py).
        cfg = replace(SMOKE, batch_size=SMOKE.n_train, epochs=2, max_grad_norm=1e-3, n_evals=1, precision="fp32")
        lm = load_tiny_model("llama")
        res = train_lora(lm, cfg, tmp_path / "run", progress=False)
        steps, evals, _ = res.log.frames()
        assert steps["step"].to_list() == [1, 2] and evals["step"].to_list() == [0, 2]

        ref = attach_lora(load_tiny_model("llama").model, cfg)
        ref.train()
        rows = encode_examples(lm.tokenizer, make_task(cfg.n_train, cfg.n_test, cfg.seed).train)
        batch = collate(lm.tokenizer.pad_token_id)(rows)
        loss = ref(**batch).loss
        loss.backward()
        grad_norm = torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in ref.parameters() if p.grad is not None])
        )
        first = steps.row(0, named=True)
        assert first["loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert first["grad_norm"] == pytest.approx(grad_norm.item(), rel=1e-4)
        assert first["grad_norm"] > 100 * cfg.max_grad_norm  # logged before clipping
        assert first["tokens"] == int(batch["attention_mask"].sum())

    def test_lr_schedule_is_warmup_then_cosine(self, tmp_path):
        cfg = replace(SMOKE, epochs=5, warmup_ratio=0.2, n_evals=1)
        res = train_lora(load_tiny_model("llama"), cfg, tmp_path / "run", progress=False, do_eval=False)
        steps, _, _ = res.log.frames()
        total = res.total_steps
        warm = math.ceil(cfg.warmup_ratio * total)
        expected = [
            cfg.lr * s / warm if s < warm else cfg.lr * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
            for s in range(total)
        ]
        assert steps["lr"].to_list() == pytest.approx(expected, rel=1e-6, abs=1e-12)

    def test_checkpoints_at_quarters_with_adapter(self, tmp_path):
        res = train_lora(load_tiny_model("llama"), SMOKE, tmp_path / "run", progress=False)
        total, saves, _, _ = schedule_steps(SMOKE.n_train, SMOKE)
        assert sorted(saves) == [round(total * q / 4) for q in (1, 2, 3, 4)]
        found = sorted(int(p.name.split("-")[1]) for p in res.output_dir.glob("checkpoint-*"))
        assert found == sorted(saves)
        for step in found:
            ck = res.output_dir / f"checkpoint-{step}"
            assert (ck / "adapter_model.safetensors").exists() and (ck / "optimizer.pt").exists()

    def test_resume_reproduces_uninterrupted_run(self, tmp_path):
        cfg = replace(SMOKE, epochs=3, n_evals=3)  # 12 steps, checkpoints at 3/6/9/12, evals every 4
        full = train_lora(load_tiny_model("llama"), cfg, tmp_path / "full", progress=False)
        with pytest.raises(KeyboardInterrupt):
            train_lora(load_tiny_model("llama"), cfg, tmp_path / "cut", progress=False, interrupt_after=8)
        resumed = train_lora(load_tiny_model("llama"), cfg, tmp_path / "cut", progress=False)
        assert resumed.resumed_from == 6  # the last checkpoint before the interruption; steps 7-8 are redone
        a, b = full.log.frames(), resumed.log.frames()
        for col in ("step", "loss", "grad_norm", "lr", "tokens"):
            assert a[0][col].to_list() == b[0][col].to_list(), col
        assert a[1].equals(b[1])  # eval losses
        ids = _ids(full.tokenizer)
        assert torch.equal(_logits(full.model, ids), _logits(resumed.model, ids))

    def test_resume_refuses_a_different_config(self, tmp_path):
        cfg = replace(SMOKE, epochs=1, n_evals=1)
        train_lora(load_tiny_model("llama"), cfg, tmp_path / "run", progress=False)
        with pytest.raises(LabError, match="different config"):
            train_lora(load_tiny_model("llama"), replace(cfg, lr=1e-3), tmp_path / "run", progress=False)

    @pytest.fixture(scope="class")
    def interrupted(self, tmp_path_factory):
        """A run stopped after step 3 of 4: checkpoints 1 and 2 on disk."""
        folder = tmp_path_factory.mktemp("lora") / "run"
        cfg = replace(SMOKE, epochs=1, n_evals=1)
        with pytest.raises(KeyboardInterrupt):
            train_lora(load_tiny_model("llama"), cfg, folder, progress=False, interrupt_after=3)
        assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
        return cfg, folder

    @pytest.mark.parametrize(
        "name",
        [
            "adapter_model.safetensors",
            "optimizer.pt",
            "scheduler.pt",
            "rng_state.pth",
            "trainer_state.json",
            "lab_log.json",
        ],
    )
    def test_damaged_checkpoint_names_the_file_and_the_fix(self, interrupted, name, tmp_path, monkeypatch):
        """A truncated file in the latest checkpoint is refused before any compute; the fix it names (delete that
        checkpoint) resumes from the one before it."""
        import shutil

        import lab.train.lora

        cfg, original = interrupted
        folder = tmp_path / "run"
        shutil.copytree(original, folder)
        latest = folder / "checkpoint-2"
        path = latest / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

        def no_compute(*a, **k):
            raise AssertionError("compute started before the damaged checkpoint was refused")

        with monkeypatch.context() as m:
            m.setattr(lab.train.lora, "attach_lora", no_compute)
            with pytest.raises(LabError) as err:
                train_lora(load_tiny_model("llama"), cfg, folder, progress=False)
        message = str(err.value)
        assert message.startswith(f"{path} is truncated or corrupt (") and "\n" not in message
        assert message.endswith(
            f": delete {latest} to resume from the checkpoint before it, or pass --fresh to start over"
        )
        shutil.rmtree(latest)
        assert train_lora(load_tiny_model("llama"), cfg, folder, progress=False).resumed_from == 1

    def test_damaged_adapter_names_the_fix(self, tmp_path):
        lm = load_tiny_model("llama")
        res = train_lora(lm, replace(SMOKE, epochs=1, n_evals=1), tmp_path / "run", progress=False, do_eval=False)
        folder = save_adapter(res.model, tmp_path / "adapter")
        path = folder / "adapter_model.safetensors"
        path.write_bytes(path.read_bytes()[:100])
        with pytest.raises(LabError) as err:
            load_adapter(load_tiny_model("llama"), folder)
        assert str(err.value).startswith(f"{path} is truncated or corrupt (")
        assert str(err.value).endswith(
            f"delete {folder} and train it again (`lab run <track>` for the track that owns the folder)"
        )

    def test_adam_moments_first_step(self, tmp_path):
        # After Adam's first step m = (1-b1) g and v = (1-b2) g^2, so the bias-corrected update m̂/sqrt(v̂) is
        # sign(g): RMS 1 wherever the gradient is non-zero. LoRA's A matrices get zero gradient while B = 0. On the
        # fp32 path: in bf16 some of B's gradients are so small that Adam's eps is not negligible beside them.
        cfg = replace(SMOKE, n_evals=1, precision="fp32")
        res = train_lora(load_tiny_model("llama"), cfg, tmp_path / "run", progress=False, do_eval=False)
        _, _, moments = res.log.frames()
        first = moments.filter(pl.col("step") == 1)
        assert first.height == 2 * 2 * len(ALL_LINEAR)  # 2 layers x 7 modules x (A, B)
        a, b = first.filter(pl.col("matrix") == "A"), first.filter(pl.col("matrix") == "B")
        assert a["m_abs_mean"].max() == 0.0 and a["update_rms"].max() == 0.0
        assert b["update_rms"].to_list() == pytest.approx([1.0] * b.height, abs=1e-3)
        later = moments.filter(pl.col("step") == res.total_steps, pl.col("matrix") == "A")
        assert later["m_abs_mean"].min() > 0  # once B moved, A gets gradients too

    def test_moment_stats_brute_force(self):
        # Three Adam steps on a fake LoRA parameter; statistics recomputed from the optimizer's update rule.
        class Toy(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = torch.nn.ModuleList([torch.nn.Module()])
                self.layers[0].q_proj = torch.nn.Module()
                self.layers[0].q_proj.lora_B = torch.nn.ParameterDict(
                    {"default": torch.nn.Parameter(torch.zeros(3, 2))}
                )

        toy = Toy()
        p = toy.layers[0].q_proj.lora_B["default"]
        opt = torch.optim.AdamW([p], lr=0.1, betas=(0.8, 0.9), eps=1e-3)
        gen = torch.Generator().manual_seed(0)
        grads = [torch.randn(3, 2, generator=gen) for _ in range(3)]
        for g in grads:
            p.grad = g.clone()
            opt.step()
        m = sum(0.2 * 0.8 ** (2 - i) * g for i, g in enumerate(grads))
        v = sum(0.1 * 0.9 ** (2 - i) * g * g for i, g in enumerate(grads))
        upd = (m / (1 - 0.8**3)) / ((v / (1 - 0.9**3)).sqrt() + 1e-3)
        (row,) = moment_stats(toy, opt, step=3)
        assert (row["layer"], row["module"], row["matrix"], row["n"]) == (0, "q_proj", "B", 6)
        assert row["m_abs_mean"] == pytest.approx(m.abs().mean().item(), rel=1e-5)
        assert row["v_sqrt_mean"] == pytest.approx(v.sqrt().mean().item(), rel=1e-5)
        assert row["update_rms"] == pytest.approx(upd.pow(2).mean().sqrt().item(), rel=1e-5)


class TestQLoRA:
    """4-bit NormalFloat base + LoRA, trained on the CPU."""

    def test_gradients_match_dequantized_float_model(self):
        import bitsandbytes as bnb
        import bitsandbytes.functional as bf

        cfg = replace(SMOKE, rank=4)
        q = quantize_nf4(load_tiny_model("llama"))
        ref = load_tiny_model("llama").model
        qmods = dict(q.model.named_modules())
        n_quant = 0
        for name, mod in ref.named_modules():  # the same network with the 4-bit weights dequantized to fp32
            if isinstance(qmods.get(name), bnb.nn.Linear4bit):
                w = qmods[name].weight
                mod.weight.data = bf.dequantize_4bit(w.data, w.quant_state).float()
                n_quant += 1
        assert n_quant == 2 * len(ALL_LINEAR)
        qm, rm = attach_lora(q.model, cfg), attach_lora(ref, cfg)
        gen = torch.Generator().manual_seed(1)
        for (n1, p1), (_, p2) in zip(qm.named_parameters(), rm.named_parameters(), strict=True):
            if "lora_B" in n1:  # non-zero B so that A's gradients are non-zero too
                p1.data = torch.randn(p1.shape, generator=gen) * 0.05
                p2.data = p1.data.clone()
        ids = _ids(q.tokenizer)
        qm.eval()
        with torch.no_grad():  # an evaluation first: the case where bitsandbytes repacks weights for inference
            qm(input_ids=ids)
        grads = []
        for model in (qm, rm):
            model.train()
            model(input_ids=ids, labels=ids).loss.backward()
            grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert grads[0].keys() == grads[1].keys()
        for name in grads[1]:
            torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-7, msg=name)

    def test_qlora_run_trains(self, tmp_path):
        cfg = replace(SMOKE, quant="nf4", epochs=3)
        res = train_lora(load_tiny_model("llama"), cfg, tmp_path / "run", progress=False)
        steps, evals, _ = res.log.frames()
        assert steps["loss"].is_finite().all()
        assert evals["eval_loss"][-1] < evals["eval_loss"][0]
        assert (tmp_path / "run" / f"checkpoint-{res.total_steps}" / "adapter_model.safetensors").exists()


class TestEvaluation:
    """Generation and perplexity against transformers' own computations."""

    def test_batched_greedy_matches_single_prompt_generate(self):
        lm = load_tiny_model("llama")
        prompts = ["Log this event: Ann", "Note this down: In 1999, a long sentence about Rome and Kyoto.", "Hi"]
        batched = greedy_answers(lm.model, lm.tokenizer, prompts, max_new_tokens=10)
        for prompt, got in zip(prompts, batched, strict=True):
            ids = _ids(lm.tokenizer, chat_text(lm.tokenizer, prompt))
            out = lm.model.generate(
                input_ids=ids,
                max_new_tokens=10,
                do_sample=False,
                eos_token_id=end_token_id(lm.tokenizer),
                pad_token_id=0,
            )[0, ids.shape[1] :]
            out = out.tolist()
            if end_token_id(lm.tokenizer) in out:
                out = out[: out.index(end_token_id(lm.tokenizer))]
            assert got == lm.tokenizer.decode(out, skip_special_tokens=True)

    def test_perplexity_matches_hf_loss(self):
        lm = load_tiny_model("llama")
        from lab.data.corpus import smoke_text

        text = smoke_text()
        ids = torch.tensor(lm.tokenizer(text, add_special_tokens=False)["input_ids"][: 64 * 3]).view(3, 64)
        with torch.no_grad():
            losses = [lm.model(input_ids=row[None], labels=row[None]).loss.item() for row in ids]
        assert perplexity(lm.model, lm.tokenizer, text, window=64, n_windows=3, batch_size=2) == pytest.approx(
            math.exp(sum(losses) / 3), rel=1e-5
        )


def test_answer_round_trip():
    assert score_answer(answer_for("Zoë", "São Paulo", 2001), {"who": "Zoë", "where": "São Paulo", "year": 2001}) == (
        True,
        True,
    )


def test_default_config_is_the_cpu_profile():
    assert config_for(get_profile("cpu")) == FinetuneConfig()


def test_a_recipe_per_profile():
    from lab.profiles import PROFILES, Profile
    from lab.tracks.A_finetuning.config import RECIPES

    assert set(RECIPES) == set(PROFILES)
    with pytest.raises(LabError, match=r"no recipe for profile 'laptop'.*RECIPES"):
        config_for(Profile("laptop", "", "cpu", "smoke", "tiny-llama"))


class TestTrack:
    """The track's plan and its results, from a real smoke run of the notebook as a script."""

    def test_plan_shares_the_main_run(self):
        from lab.tracks.A_finetuning.config import plan

        cfg = config_for(get_profile("cpu"))
        runs = plan(cfg)
        assert runs[0].name == "main" and runs[0].cfg == cfg
        lrs = sorted(r.cfg.lr for r in runs if "lr" in r.groups)
        ranks = sorted(r.cfg.rank for r in runs if "rank" in r.groups)
        assert lrs == [1e-5, 2e-4, 1e-3, 5e-3] and ranks == [1, 8, 16, 64]
        for r in runs:  # every sweep run differs from main in the swept setting(s) only
            changed = {k for k in ("lr", "rank", "batch_size", "quant") if getattr(r.cfg, k) != getattr(cfg, k)}
            assert replace(r.cfg, **{k: getattr(cfg, k) for k in changed}) == cfg
            if r.rule == "linear":
                assert r.cfg.lr / r.cfg.batch_size == pytest.approx(cfg.lr / cfg.batch_size)
        assert len({r.name for r in runs}) == len(runs)

    @pytest.mark.parametrize(
        "losses, expected",
        [
            ([3.0, 2.0, 1.5, 1.4], None),  # still falling
            ([3.0, 2.0, 1.5, 1.6, 1.8], 2),  # lowest at the third eval (step 2), then up by > 2 %
            ([3.0, 2.0, 1.5, 1.51], None),  # within tolerance
        ],
    )
    def test_divergence_step(self, losses, expected):
        from lab.tracks.A_finetuning.frames import divergence_step

        evals = pl.DataFrame({"step": list(range(len(losses))), "eval_loss": losses})
        assert divergence_step(evals) == expected

    def test_moments_summary_weights_by_parameter_count(self):
        from lab.tracks.A_finetuning.frames import moments_summary

        rows = [  # (step, layer, module, matrix, n, sqrt v); only the last step counts
            (1, 0, "q_proj", "A", 10, 9.0),
            (2, 0, "q_proj", "A", 10, 1.0),
            (2, 0, "q_proj", "B", 30, 3.0),
            (2, 1, "v_proj", "A", 10, 2.0),
            (2, 1, "v_proj", "B", 10, 4.0),
        ]
        df = pl.DataFrame(rows, schema=["step", "layer", "module", "matrix", "n", "v_sqrt_mean"], orient="row")
        got = moments_summary(df)
        assert got["moments_step"] == 2
        assert got["moments_v_first_layer"] == pytest.approx((10 * 1 + 30 * 3) / 40)  # 2.5
        assert got["moments_v_last_layer"] == pytest.approx(3.0) and got["moments_v_max_layer"] == 1
        assert got["moments_v_min_layer"] == 0 and got["moments_v_min"] == pytest.approx(2.5)
        assert got["moments_b_over_a"] == pytest.approx(((30 * 3 + 10 * 4) / 40) / ((10 * 1 + 10 * 2) / 20))
        assert got["moments_top_module"] == "v_proj" and got["moments_top_module_over_bottom"] == pytest.approx(3 / 2.5)

    def test_notebook_as_script_writes_every_result(self, tmp_path, smoke_results):
        import os
        import subprocess
        import sys

        root = Path(__file__).resolve().parent.parent
        # Re-uses the runs the session's smoke run left in the suite's data folder (finished runs are found
        # again, not retrained).
        env = {**os.environ, "LAB_RESULTS_DIR": str(tmp_path / "results")}
        out = subprocess.run(
            [sys.executable, str(root / "notebooks" / "A_finetuning.py"), "--", "--profile", "smoke"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        folder = tmp_path / "results" / "smoke" / "A_finetuning"
        for name in (
            "runs",
            "anatomy",
            "lr_curves",
            "lr_outcomes",
            "rank_curves",
            "rank_outcomes",
            "batch_lr",
            "moments",
            "moments_by_module",
        ):
            assert (folder / f"{name}.parquet").exists() and (folder / f"{name}.vl.json").exists(), name
        for name in (
            "batch_outcomes",
            "optimizer_memory",
            "qlora",
            "samples",
            "probes",
            "benchmark",
            "summary",
            "answers",
            "fields",
        ):
            assert (folder / f"{name}.parquet").exists(), name
        runs = pl.read_parquet(folder / "runs.parquet")
        summary = pl.read_parquet(folder / "summary.parquet").row(0, named=True)
        main = runs.filter(pl.col("run") == "main").row(0, named=True)
        assert summary["main_exact_rate"] == main["exact_rate"] and summary["n_runs"] == runs.height - 1
        assert (runs["exact_lo"] <= runs["exact_rate"]).all() and (runs["exact_rate"] <= runs["exact_hi"]).all()
        # Per-field scores, re-derived from the stored answers, agree with the exact scores of every run.
        fields = pl.read_parquet(folder / "fields.parquet").join(
            runs.select("run", "exact_rate"), on="run", suffix="_runs"
        )
        assert fields.height == runs.height and (fields["exact_rate"] == fields["exact_rate_runs"]).all()
        answers = pl.read_parquet(folder / "answers.parquet")
        assert answers.height == summary["n_test"] and summary["main_misses"] == int((~answers["exact"]).sum())
        assert (data_dir() / "adapters" / "smoke" / "A_finetuning" / "main" / "adapter_model.safetensors").exists()
        reference = pl.read_parquet(smoke_results / "A_finetuning" / "runs.parquet")
        assert runs.drop("wall_time_s").equals(reference.drop("wall_time_s"))
        anatomy = pl.read_parquet(folder / "anatomy.parquet")
        assert anatomy["step"].to_list() == list(range(main["steps"] + 1))
        memory = pl.read_parquet(folder / "optimizer_memory.parquet")
        adamw = memory.filter(pl.col("optimizer") == "AdamW (fp32)")
        # fp32 exp_avg + exp_avg_sq per parameter, plus one fp32 `step` scalar per tensor
        assert adamw["state_bytes"].to_list() == (8 * adamw["trainable_params"] + 4 * adamw["param_tensors"]).to_list()
        assert "fine-tune instrumentation overhead" in out.stdout
