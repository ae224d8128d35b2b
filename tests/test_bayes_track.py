"""Wind-tunnel training and the D_bayes track end to end on the smoke profile."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import polars as pl
import pytest
import torch

from lab.data.windtunnel import uniform_floor_bits
from lab.errors import LabError
from lab.models.windtunnel import ModelSpec
from lab.profiles import get_profile
from lab.tracks.D_bayes import config, frames
from lab.tracks.D_bayes.run import run as run_track
from lab.tracks.D_bayes.summary import BayesSummary
from lab.train.windtunnel import TrainConfig, train_run

ROOT = Path(__file__).resolve().parent.parent


class TestSchedule:
    def test_warmup_and_cosine_analytic(self):
        c = TrainConfig(steps=1000, lr=1e-3, warmup=100, min_lr_frac=0.1)
        assert c.lr_at(0) == pytest.approx(1e-5)
        assert c.lr_at(99) == pytest.approx(1e-3)
        assert c.lr_at(550) == pytest.approx((1e-3 + 1e-4) / 2)
        assert c.lr_at(1000) == pytest.approx(1e-4)


class TestTraining:
    """A tiny model learns the V=4 task, and finished runs are cached."""

    SPEC = ModelSpec("transformer", n_layer=2, n_head=2, d_model=32)
    CFG = TrainConfig(steps=300, batch_size=64, lr=3e-3, warmup=20, eval_every=100, eval_sequences=256)

    @pytest.fixture(scope="class")
    def run(self, tmp_path_factory):
        root = tmp_path_factory.mktemp("ck")
        return root, train_run("t", 4, self.SPEC, self.CFG, 0, root, progress=False)

    def test_learns_well_below_the_context_blind_floor(self, run):
        _, r = run
        first, last = r.log.row(0, named=True), r.log.row(-1, named=True)
        assert first["mae_bits"] == pytest.approx(uniform_floor_bits(4), abs=0.05)  # init: a uniform guess
        assert last["mae_bits"] < 0.5 * uniform_floor_bits(4)
        assert last["kl_bits"] < 0.5 * first["kl_bits"]
        assert r.log["step"].to_list() == [0, 100, 200, 300]

    def test_cached_run_is_reused_and_identical(self, run):
        root, r = run
        again = train_run("t", 4, self.SPEC, self.CFG, 0, root, progress=False)
        assert again.cached and again.train_time_s == r.train_time_s
        tokens = torch.randint(0, 8, (3, 5))
        torch.testing.assert_close(again.model(tokens)[0], r.model(tokens)[0])
        other = train_run("t", 4, self.SPEC, replace(self.CFG, steps=10), 0, root, progress=False)
        assert not other.cached  # a different config is a different run

    @pytest.mark.parametrize(
        "change, match",
        [
            (dict(lr=0.0), r"bad wind-tunnel training config: lr must be a finite number > 0 \(got 0.0\)"),
            (dict(lr=float("inf")), r"lr must be a finite number > 0 \(got inf\)"),
            (dict(steps=0), r"steps must be an integer >= 1 \(got 0\)"),
            (dict(batch_size=0), r"batch_size must be an integer >= 1 \(got 0\)"),
            (dict(min_lr_frac=1.5), r"min_lr_frac must be in \[0, 1\] \(got 1.5\)"),
            (dict(warmup=-1), r"warmup must be an integer >= 0 \(got -1\)"),
            (dict(eval_every=0), r"eval_every must be an integer >= 1 \(got 0\)"),
            (dict(eval_sequences=0), r"eval_sequences must be an integer >= 1 \(got 0\)"),
            (dict(beta2=1.0), r"beta2 must be in \[0, 1\) \(got 1.0\)"),
            (dict(grad_clip=-1.0), r"grad_clip must be a finite number > 0 \(got -1.0\)"),
            (dict(weight_decay=float("nan")), r"weight_decay must be a finite number >= 0 \(got nan\)"),
        ],
    )
    def test_config_validates_itself(self, change, match):
        """A TrainConfig refuses what would break the schedule or the evaluation, naming the field and its range."""
        with pytest.raises(LabError, match=match):
            replace(self.CFG, **change)

    def test_every_problem_in_one_error(self):
        with pytest.raises(LabError) as err:
            replace(self.CFG, steps=0, lr=-1.0)
        assert "steps must be" in str(err.value) and "lr must be" in str(err.value)

    @pytest.mark.parametrize("name", ["meta.json", "model.safetensors", "log.parquet"])
    def test_damaged_cached_run_names_the_file_and_the_fix(self, run, name, tmp_path):
        """A cached run with a truncated file is refused in one line; the fix it names (delete the folder) works."""
        import shutil

        root, r = run
        copy = tmp_path / r.folder.name
        shutil.copytree(r.folder, copy)
        path = copy / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        with pytest.raises(LabError) as err:
            train_run("t", 4, self.SPEC, self.CFG, 0, tmp_path, progress=False)
        message = str(err.value)
        assert message.startswith(f"{path} is truncated or corrupt (")
        assert message.endswith(f": delete {copy} (the run is trained again) or pass --fresh")
        again = train_run("t", 4, self.SPEC, self.CFG, 0, tmp_path, fresh=True, progress=False)
        assert not again.cached and again.log.equals(r.log.with_columns(again.log["train_s"]))  # retrained alike

    def test_finished_run_is_published_whole(self, run):
        """The run folder holds exactly the three files (no temp sibling left), and a half-written folder of a
        killed run is replaced, not trusted."""
        root, r = run
        assert sorted(p.name for p in r.folder.iterdir()) == ["log.parquet", "meta.json", "model.safetensors"]
        assert not [p for p in root.iterdir() if p.name.startswith(".")]
        cfg = replace(self.CFG, steps=5, eval_every=5)
        partial = train_run("p", 4, self.SPEC, cfg, 0, root, progress=False).folder
        for f in partial.iterdir():
            f.unlink()
        (partial / "model.safetensors").write_bytes(b"truncated")  # killed before meta.json was written
        again = train_run("p", 4, self.SPEC, cfg, 0, root, progress=False)
        assert not again.cached and again.folder == partial
        assert sorted(p.name for p in partial.iterdir()) == ["log.parquet", "meta.json", "model.safetensors"]
        assert train_run("p", 4, self.SPEC, cfg, 0, root, progress=False).cached


class TestTrack:
    """``lab run D_bayes --profile smoke`` writes every result the page uses, consistently."""

    @pytest.fixture(scope="class")
    def results(self, tmp_path_factory):
        base = tmp_path_factory.mktemp("res")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LAB_RESULTS_DIR", str(base))
            mp.setenv("LAB_DATA_DIR", str(tmp_path_factory.mktemp("data")))
            summary = run_track(get_profile("smoke"), progress=False)
            again = run_track(get_profile("smoke"), progress=False)
        return summary, again, base / "smoke" / "D_bayes"

    def test_every_result_is_written(self, results):
        _, _, folder = results
        for name in (
            "summary",
            "comparison",
            "seeds",
            "curves",
            "calibration",
            "search",
            "key_orthogonality",
            "routing",
            "pca",
            "pca_points",
            "logit_lens",
            "ablations",
            "verdicts",
            "mech_summary",
        ):
            assert (folder / f"{name}.parquet").exists(), name
        for name in (
            "curves",
            "calibration",
            "search",
            "key_orthogonality",
            "routing",
            "pca_points",
            "logit_lens",
            "ablations",
        ):
            assert (folder / f"{name}.vl.json").exists(), name

    def test_summary_agrees_with_the_per_seed_table(self, results):
        summary, _, folder = results
        seeds = pl.read_parquet(folder / "seeds.parquet").filter(pl.col("model") == "transformer")
        assert seeds.height == summary.n_seeds == 3
        assert summary.mae_mean == pytest.approx(seeds["mae_bits"].mean())
        assert summary.mae_max == pytest.approx(seeds["mae_bits"].max())
        assert summary.floor_bits == pytest.approx(uniform_floor_bits(6))
        search = pl.read_parquet(folder / "search.parquet")
        assert search["headline"].sum() == 1
        assert search.filter(pl.col("headline"))["mae_bits"].item() == pytest.approx(
            seeds.filter(pl.col("seed") == 0)["mae_bits"].item()
        )

    def test_curves_hold_the_paper_reference(self, results):
        _, _, folder = results
        curves = pl.read_parquet(folder / "curves.parquet")
        paper = curves.filter(pl.col("seed") == -1)
        assert paper["step"].to_list() == [s for s, _ in config.PAPER_CURVE]

    def test_verdicts_use_the_fixed_vocabulary(self, results):
        _, _, folder = results
        v = pl.read_parquet(folder / "verdicts.parquet")
        assert v.height == 8 and set(v["verdict"]) <= {"reproduced", "partly", "not reproduced"}

    def test_summary_file_is_the_returned_summary(self, results):
        """summary.parquet has the dataclass's fields, in order, with the values run() returned."""
        _, summary, folder = results  # the second run wrote last
        written = pl.read_parquet(folder / "summary.parquet")
        assert written.columns == [f.name for f in fields(BayesSummary)]
        assert written.row(0, named=True) == pytest.approx(summary.as_dict(), nan_ok=True)
        assert (
            summary.verdicts_reproduced
            == (pl.read_parquet(folder / "verdicts.parquet")["verdict"] == "reproduced").sum()
        )

    def test_second_run_reuses_every_training_run(self, results):
        summary, again, _ = results
        # seeds, MLP, the LSTM at each of its 2 learning rates, the extra search config, the ladder's other rung x 2
        assert again.cached_runs == 3 + 1 + 2 + 1 + 2
        assert again.mae_mean == summary.mae_mean
        assert again.hmm_train_s == summary.hmm_train_s and again.hmm_kl_bits == summary.hmm_kl_bits  # HMM cached

    def test_gpu_profile_refuses_without_cuda(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        with pytest.raises(LabError, match="CUDA"):
            run_track(get_profile("gpu"), write=False)


class TestConfig:
    """The recipes validate themselves; a bad one names the fix."""

    SMOKE = config.RECIPES["smoke"]

    def test_every_profile_has_a_recipe(self):
        for name in ("smoke", "cpu", "gpu"):
            cfg = config.config_for(get_profile(name))
            assert cfg.headline in cfg.search and cfg.floor_bits == pytest.approx(uniform_floor_bits(cfg.V))
        assert config.config_for(get_profile("cpu")).headline.model == ModelSpec("transformer", 2, 4, 64)

    def test_unknown_profile(self):
        other = replace(get_profile("smoke"), name="tpu")
        with pytest.raises(LabError, match="no recipe for profile 'tpu'"):
            config.config_for(other)

    def test_headline_must_be_searched(self):
        with pytest.raises(LabError, match="add it to `search`"):
            replace(self.SMOKE, search=self.SMOKE.search[1:])

    def test_controls_and_seeds(self):
        with pytest.raises(LabError, match="controls must be"):
            replace(self.SMOKE, mlp=ModelSpec("lstm", d_model=16))
        with pytest.raises(LabError, match="seeds must be distinct"):
            replace(self.SMOKE, seeds=(0, 0))
        with pytest.raises(LabError, match="V >= 3"):
            replace(self.SMOKE, V=2)

    def test_pca_points_fit_one_chart(self):
        with pytest.raises(LabError, match="lower it to 1000 or less"):  # V=6: 5 points per sequence
            replace(self.SMOKE, points_sequences=1001)
        assert replace(self.SMOKE, points_sequences=1000).points_sequences == 1000

    def test_search_holds_transformers_only(self):
        with pytest.raises(LabError, match="compares transformers only"):
            config.Candidate("mlp", ModelSpec("mlp", d_model=16), self.SMOKE.controls_train)

    def test_notebook_candidate(self):
        c = config.custom_candidate(self.SMOKE, n_layer=1, d_model=16, lr=1e-3, steps=400)
        assert (c.model.n_head, c.train.eval_every, c.train.eval_sequences) == (2, 20, 128)
        assert config.custom_candidate(self.SMOKE, n_layer=1, d_model=64, lr=1e-3, steps=100).model.n_head == 4


class TestVerdictRules:
    """The verdict rules on hand-made measurements."""

    def _mech(self, key_trained, key_init):
        keys = pl.DataFrame(
            {"state": ["trained", "init"], "tokens": ["key tokens"] * 2, "mean_abs_cos": [key_trained, key_init]}
        )
        routing = pl.DataFrame(
            {
                "state": ["trained"] * 2,
                "layer": [0, 1],
                "value_mass": [0.3, 0.9],
                "qk_cos_value": [0.1, 0.5],
                "qk_cos_key": [0.1, -0.2],
            }
        )
        pca = pl.DataFrame({"state": ["trained"], "component": [1], "variance_share": [0.9], "corr_h_bayes": [-0.95]})
        lens = pl.DataFrame(
            {"seed": [0] * 3, "stage": [0, 1, 2], "sublayer": ["embed", "attn", "ffn"], "kl_bits": [1.0, 0.8, 0.1]}
        )
        abl = pl.DataFrame(
            {
                "target": ["attn", "ffn", "head", "head"],
                "method": ["mean", "mean", "zero", "zero"],
                "delta_mae_bits": [0.6, 0.9, 0.1, 0.2],
            }
        )
        return frames.Mechanisms(keys, routing, pca, None, lens, abl)

    SEEDS = pl.DataFrame(
        {
            "model": ["transformer", "transformer", "mlp"],
            "seed": [0, 1, 0],
            "n_params": [1000, 1000, 990],
            "steps": [40] * 3,
            "train_s": [1.0] * 3,
            "cached": [False] * 3,
            "mae_bits": [0.010, 0.012, 1.1],
            "kl_bits": [0.01] * 3,
            "mae_mean_entropy_bits": [0.01] * 3,
            "mass_eliminated": [0.0] * 3,
        }
    )  # the columns of frames.seeds_frame

    def test_rules(self):
        v = frames.verdicts_frame(self.SEEDS, self._mech(0.05, 0.08), floor=1.107)
        assert v["verdict"].to_list() == ["reproduced"] * 8
        assert v["ours"][0] == "0.0110 ± 0.0014 bits; 1,000 params"  # mean and sample std of 0.010, 0.012
        v = frames.verdicts_frame(self.SEEDS, self._mech(0.3, 0.2), floor=1.107)["verdict"].to_list()
        assert v[2] == "not reproduced"

    def test_headline_rules(self):
        """A seed above 0.02 bits makes the headline partial; a context-using "MLP" fails the control claim."""
        worse = self.SEEDS.with_columns(pl.Series("mae_bits", [0.010, 0.03, 0.2]))
        v = frames.verdicts_frame(worse, self._mech(0.05, 0.08), floor=1.107)["verdict"].to_list()
        assert v[:2] == ["partly", "not reproduced"]


class TestNotebook:
    def test_script_mode_writes_results(self, tmp_path, smoke_results):
        # The session's smoke run trained these models into the suite's data folder; the notebook re-uses them
        # (and so checks that finished runs are found again) instead of training everything a second time.
        env = {**os.environ, "LAB_RESULTS_DIR": str(tmp_path)}
        out = subprocess.run(
            [sys.executable, str(ROOT / "notebooks" / "D_bayes.py"), "--", "--profile", "smoke"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        summary = pl.read_parquet(tmp_path / "smoke" / "D_bayes" / "summary.parquet")
        assert summary["n_seeds"].item() == 3 and summary["V"].item() == 6
        reference = pl.read_parquet(smoke_results / "D_bayes" / "summary.parquet")
        assert summary["cached_runs"].item() > 0 and summary["mae_mean"].item() == reference["mae_mean"].item()

    def test_bad_profile(self, tmp_path):
        out = subprocess.run(
            [sys.executable, str(ROOT / "notebooks" / "D_bayes.py"), "--", "--profile", "huge"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=300,
        )
        assert out.returncode != 0 and "unknown profile 'huge'" in out.stderr
