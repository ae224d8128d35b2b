"""Track E (WS2 + WS3): plain-text LoRA rows, loss scoring against HF's own loss, the recipe's validation,
checkpoints scored and reloaded, the summary as written, the transcoders' report."""

from __future__ import annotations

import dataclasses
import json

import polars as pl
import pytest
import torch

from lab.data import constraints as C
from lab.errors import LabError
from lab.interp.transcoders import TranscoderConfig
from lab.models.loading import load_tiny_model
from lab.profiles import Profile, get_profile
from lab.tracks.E_circuits import frames as F
from lab.tracks.E_circuits import run as E
from lab.tracks.E_circuits.config import RECIPES, config_for
from lab.tracks.E_circuits.summary import CircuitsSummary
from lab.train.lora import schedule_steps


@pytest.fixture(scope="module")
def lm():
    return load_tiny_model("llama", seed=0)


def test_encode_texts_is_the_scoring_tokenisation_plus_eos(lm):
    tok = lm.tokenizer
    rows = C.encode_texts(tok, ["To florp means to move up.", "Blarf means happy."])
    for row, text in zip(rows, ["To florp means to move up.", "Blarf means happy."], strict=True):
        assert row["input_ids"] == tok(text)["input_ids"] + [tok.eos_token_id]
        assert row["labels"] == row["input_ids"]  # loss on every token; the model shifts labels itself


def test_loss_on_concepts_labels_exactly_the_concept_tokens(lm):
    tok = lm.tokenizer
    texts = ["To florp means to move up.", '"I am so blarf today," said Mia, meaning Mia was happy.']
    rows = C.encode_texts(tok, texts, loss_on=C.concepts())
    for row, text, word in zip(rows, texts, ["up", "happy"], strict=True):
        assert row["input_ids"] == tok(text)["input_ids"] + [tok.eos_token_id]
        kept = [i for i, lab in zip(row["input_ids"], row["labels"], strict=True) if lab != -100]
        assert kept and tok.decode(kept).strip().rstrip(".") == word
    with pytest.raises(LabError, match="loss_on=None"):
        C.encode_texts(tok, ["No concept here."], loss_on=C.concepts())


def test_mean_token_loss_counts_only_labelled_tokens(lm):
    rows = C.encode_texts(lm.tokenizer, ["To florp means to move up."], loss_on=C.concepts())
    with torch.no_grad():
        hf = lm.model(input_ids=torch.tensor([rows[0]["input_ids"]]), labels=torch.tensor([rows[0]["labels"]])).loss
    assert C.mean_token_loss(lm.model, rows) == pytest.approx(hf.item(), rel=1e-5)


def test_mean_token_loss_matches_hf_loss(lm):
    rows = C.encode_texts(lm.tokenizer, ["To florp means to move up.", "Gleem means sad, said Mia."])
    with torch.no_grad():
        hf = [
            lm.model(input_ids=torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])).loss.item()
            for r in rows
        ]
    n = [len(r["input_ids"]) - 1 for r in rows]
    assert C.mean_token_loss(lm.model, rows[:1]) == pytest.approx(hf[0], rel=1e-5)
    # several rows: the token-weighted mean of HF's per-row means
    assert C.mean_token_loss(lm.model, rows) == pytest.approx((hf[0] * n[0] + hf[1] * n[1]) / sum(n), rel=1e-5)


def test_learned_at():
    frame = pl.DataFrame(
        {
            "constraint_type": ["mapping"] * 3 + ["spatial"] * 3,
            "fraction": [0.0, 0.5, 1.0] * 2,
            "accuracy": [0.25, 0.95, 1.0, 0.2, 0.5, 0.85],
        }
    )
    assert F.learned_at(frame, "mapping") == 0.5
    assert F.learned_at(frame, "spatial") is None
    assert F.learned_at(frame, "spatial", threshold=0.5) == 0.5


class TestConfig:
    """Every recipe validates; a bad value raises a LabError that names the fix."""

    def test_every_profile_has_a_recipe(self):
        from lab.profiles import PROFILES

        assert {name: config_for(p) for name, p in PROFILES.items()} == RECIPES

    def test_unknown_profile(self):
        with pytest.raises(LabError, match="no recipe for profile 'huge'"):
            config_for(Profile(name="huge", description="", device="cpu", corpus="smoke", lm="tiny-llama"))

    @pytest.mark.parametrize(
        ("change", "fix"),
        [
            ({"loss": "words"}, "loss must be one of concept, all"),
            ({"per_type": 3}, "use at least 4"),
            ({"hub_transcoders": "gemma"}, "exactly one of transcoders"),
            ({"transcoders": None}, "exactly one of transcoders"),
            ({"model": "google/gemma-2-2b"}, "needs hub_transcoders"),
            ({"graph_words": 5}, "graph_words must be between 1 and 4"),
            ({"graph_per_word": 5}, "graph_per_word must be between 1 and 4"),  # mapping has 4 held-out prompts a word
            ({"seed_prompts": 3}, "seed_prompts must be between 0 and 2"),
            ({"settle": 0.0}, "settle is a Jaccard threshold"),
            ({"graph_per_word": 1}, "graph_per_word must be at least 2"),
            ({"seeds": ()}, "seeds must be distinct"),
            ({"seeds": (0, 0)}, "seeds must be distinct"),
        ],
    )
    def test_bad_values_name_the_fix(self, change, fix):
        with pytest.raises(LabError, match=fix):
            dataclasses.replace(RECIPES["smoke"], **change)

    def test_graph_per_word_bound_is_the_held_out_prompts_of_one_word(self):
        per_word = {}
        for hp in C.held_out_prompts():
            per_word[hp.word] = per_word.get(hp.word, 0) + 1
        most = min(per_word.values())
        dataclasses.replace(RECIPES["smoke"], graph_per_word=most)  # accepted
        with pytest.raises(LabError):
            dataclasses.replace(RECIPES["smoke"], graph_per_word=most + 1)

    def test_gpu_loads_hub_transcoders_and_builds_none(self):
        gpu = RECIPES["gpu"]
        assert gpu.transcoders is None and gpu.hub_transcoders == "gemma"
        assert isinstance(RECIPES["cpu"].transcoders, TranscoderConfig)
        with pytest.raises(LabError, match="GemmaScope.*runs for smoke, cpu"):
            E.build_transcoders(get_profile("gpu"))


class TestSmokeRun:
    @pytest.fixture(scope="class")
    def run(self, tmp_path_factory):
        root = tmp_path_factory.mktemp("e-results")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LAB_RESULTS_DIR", str(root))
            summary = E.run(get_profile("smoke"), fresh=True, progress=False)
        folder = root / "smoke" / "E_circuits"
        return summary, {
            n: pl.read_parquet(folder / f"{n}.parquet")
            for n in ("checkpoints", "prompts", "loss", "summary", "transcoders")
        }

    def test_checkpoints_at_quarters_plus_base(self, run):
        summary, f = run
        cfg = config_for(get_profile("smoke")).finetune
        total, saves, _, _ = schedule_steps(summary.n_train, cfg)
        steps = f["checkpoints"].filter(pl.col("constraint_type") == "mapping").sort("checkpoint")["step"].to_list()
        assert steps == [0, *sorted(saves)] and steps[-1] == total == summary.steps

    def test_accuracy_is_the_share_of_prompts_won(self, run):
        _, f = run
        again = (
            f["prompts"]
            .group_by("checkpoint", "constraint_type")
            .agg(pl.col("correct").mean().alias("acc"))
            .join(f["checkpoints"], on=["checkpoint", "constraint_type"])
        )
        assert (again["acc"] == again["accuracy"]).all()
        assert (again["correct"] == (again["accuracy"] * again["n"]).round()).all()

    def test_base_row_is_the_untouched_model(self, run, lm):
        _, f = run
        fresh = C.score_prompts(lm.model, lm.tokenizer)
        base = f["prompts"].filter(pl.col("checkpoint") == 0)
        assert base["margin"].to_list() == pytest.approx(fresh["margin"].to_list(), abs=1e-5)

    def test_training_lowers_validation_loss(self, run):
        summary, _ = run
        for c in C.CONSTRAINTS:
            assert getattr(summary, f"{c}_final_val_loss") < getattr(summary, f"{c}_base_val_loss")

    def test_summary_is_what_was_written(self, run):
        """The returned summary is summary.parquet: the same fields, in the same order, with the same values."""
        summary, f = run
        assert isinstance(summary, CircuitsSummary)
        assert f["summary"].columns == [fld.name for fld in dataclasses.fields(CircuitsSummary)]
        assert f["summary"].row(0, named=True) == summary.as_dict()
        base = f["checkpoints"].filter(pl.col("checkpoint") == 0)
        assert summary.n_prompts == base["n"].sum() == len(C.held_out_prompts())

    def test_transcoders_report_is_the_build(self, run):
        """``lab transcoders build`` on a built profile reports the build the run used, without training."""
        from lab import paths

        _, f = run
        report = E.build_transcoders(get_profile("smoke"), progress=False)
        folder = paths.transcoder_dir("smoke")
        meta = json.loads((folder / "meta.json").read_text())
        fvu = f["transcoders"]["fvu"]
        worst = f["transcoders"].sort("fvu")[-1]
        assert report == (
            f"transcoders for tiny-llama in {folder}: 2 layers x {meta['d_transcoder']} features "
            f"(TopK {meta['k']}), trained {meta['train_s']:.0f} s; held-out FVU mean {fvu.mean():.3f}, "
            f"worst {worst['fvu'][0]:.3f} (layer {worst['layer'][0]})"
        )


class TestNotebook:
    ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent

    def test_script_mode_writes_results(self, tmp_path, smoke_results):
        import os
        import subprocess
        import sys

        # Re-uses the session smoke run's checkpoints in the suite's data folder (a finished run resumes at its
        # last step).
        env = {**os.environ, "LAB_RESULTS_DIR": str(tmp_path)}
        out = subprocess.run(
            [sys.executable, str(self.ROOT / "notebooks" / "E_circuits.py"), "--", "--profile", "smoke"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        got = pl.read_parquet(tmp_path / "smoke" / "E_circuits" / "checkpoints.parquet")
        ref = pl.read_parquet(smoke_results / "E_circuits" / "checkpoints.parquet")
        assert got.drop("val_loss").equals(ref.drop("val_loss"))
        assert got["val_loss"].to_list() == pytest.approx(ref["val_loss"].to_list(), rel=1e-6)

    def test_bad_profile(self, tmp_path):
        import subprocess
        import sys

        out = subprocess.run(
            [sys.executable, str(self.ROOT / "notebooks" / "E_circuits.py"), "--", "--profile", "huge"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=300,
        )
        assert out.returncode != 0 and "E_circuits: error: unknown profile 'huge'" in out.stderr
