"""The questions log: the real QUESTIONS.md is clean, and each kind of problem is caught."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from lab.errors import LabError
from lab.paths import REPO_ROOT
from lab.results import write_result
from lab.site.questions import STATUSES, check_evidence, check_questions, main, parse_questions


def _log(*entries: str) -> str:
    return "# Questions\n\n## Training dynamics\n\n" + "\n\n".join(entries) + "\n"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A fake repository with one result (written by the lab, with its manifest) and one page that evidence can
    point at."""
    loss = pl.DataFrame({"step": [0, 1], "loss": [4.0, 3.0]})
    write_result("pretrain", "loss", loss, config={}, seed=0, profile="cpu", wall_time_s=0, root=tmp_path / "results")
    (tmp_path / "site-src" / "tracks").mkdir(parents=True)
    (tmp_path / "site-src" / "tracks" / "pretrain.md").write_text("# Pretraining\n")
    return tmp_path


class TestRealLog:
    """The committed QUESTIONS.md."""

    def test_real_log_is_clean(self) -> None:
        assert check_evidence(REPO_ROOT / "QUESTIONS.md", root=REPO_ROOT) == []

    def test_real_log_has_the_three_sections_and_known_statuses(self) -> None:
        questions = parse_questions((REPO_ROOT / "QUESTIONS.md").read_text())
        assert {q.section for q in questions} == {
            "Training dynamics",
            "Mechanistic interpretability",
            "Hardware & scale",
        }
        assert 12 <= len(questions) <= 30
        assert all(q.status in STATUSES for q in questions)
        assert [q.number for q in questions] == sorted(q.number for q in questions)


class TestParse:
    """parse_questions reads ids, titles, statuses and evidence links."""

    def test_fields(self) -> None:
        text = _log(
            "### Q3. Why?\nStatus: ANSWERED\nEvidence: [a](results/x.parquet), [b](site-src/p.md#h), "
            "[c](https://example.org)\n\nNotes.",
            "### Q4. How?\nStatus: OPEN",
        )
        q3, q4 = parse_questions(text)
        assert (q3.id, q3.number, q3.title, q3.section, q3.status) == ("Q3", 3, "Why?", "Training dynamics", "ANSWERED")
        assert q3.evidence == ["results/x.parquet", "site-src/p.md#h", "https://example.org"]
        assert (q4.id, q4.status, q4.evidence) == ("Q4", "OPEN", [])


class TestCheck:
    """check_questions flags each problem once and passes a good log."""

    def test_good_log_passes(self, repo: Path) -> None:
        text = _log(
            "### Q1. Answered?\nStatus: ANSWERED\n"
            "Evidence: [loss](results/pretrain/loss.parquet), [page](site-src/tracks/pretrain.md#results)",
            "### Q2. Open?\nStatus: OPEN",
            "### Q3. Exploring?\nStatus: EXPLORING",
            "### Q4. Old?\nStatus: SUPERSEDED",
        )
        assert check_questions(text, root=repo) == []

    def test_answered_without_evidence_fails(self, repo: Path) -> None:
        problems = check_questions(_log("### Q1. Answered?\nStatus: ANSWERED"), root=repo)
        assert len(problems) == 1 and "Q1" in problems[0] and "Evidence" in problems[0]

    def test_answered_with_only_an_external_link_fails(self, repo: Path) -> None:
        text = _log("### Q1. Answered?\nStatus: ANSWERED\nEvidence: [paper](https://arxiv.org/abs/1)")
        assert len(check_questions(text, root=repo)) == 1

    def test_answered_with_missing_file_fails(self, repo: Path) -> None:
        text = _log("### Q1. Answered?\nStatus: ANSWERED\nEvidence: [loss](results/pretrain/missing.parquet)")
        problems = check_questions(text, root=repo)
        assert len(problems) == 1 and "results/pretrain/missing.parquet" in problems[0]

    @pytest.mark.parametrize("target", ["../../../../etc/passwd", "/etc/passwd", "site-src/../../outside.md"])
    def test_evidence_outside_the_repository_fails(self, repo: Path, target: str) -> None:
        (repo.parent / "outside.md").write_text("# not in the repository\n")
        text = _log(f"### Q1. Answered?\nStatus: ANSWERED\nEvidence: [x]({target})")
        (problem,) = check_questions(text, root=repo)
        assert f"evidence {target!r} lies outside the repository: link to a file inside it" in problem

    def test_a_link_leading_out_of_the_repository_fails(self, repo: Path) -> None:
        (repo / "site-src" / "passwd.md").symlink_to("/etc/passwd")
        text = _log("### Q1. Answered?\nStatus: ANSWERED\nEvidence: [x](site-src/passwd.md)")
        (problem,) = check_questions(text, root=repo)
        assert "lies outside the repository" in problem

    @pytest.mark.parametrize(
        "damage, expected",
        [
            (lambda b: b"PAR1", "loss.parquet is not readable Parquet"),
            (lambda b: b[: len(b) // 2], "loss.parquet is not readable Parquet"),
            (lambda b: None, "loss.parquet differs from the sha256"),  # another valid frame, not the one written
        ],
    )
    def test_damaged_result_evidence_fails(self, repo: Path, damage, expected: str) -> None:
        path = repo / "results" / "pretrain" / "loss.parquet"
        if (data := damage(path.read_bytes())) is None:
            pl.DataFrame({"step": [0], "loss": [9.0]}).write_parquet(path)
        else:
            path.write_bytes(data)
        text = _log("### Q1. Answered?\nStatus: ANSWERED\nEvidence: [loss](results/pretrain/loss.parquet)")
        (problem,) = check_questions(text, root=repo)
        assert "Q1: evidence 'results/pretrain/loss.parquet' fails its check" in problem
        assert expected in problem and "rerun `lab run pretrain`" in problem

    def test_evidence_beside_a_truncated_manifest_fails(self, repo: Path) -> None:
        manifest = repo / "results" / "pretrain" / "manifest.json"
        manifest.write_bytes(manifest.read_bytes()[:30])
        text = _log("### Q1. Answered?\nStatus: ANSWERED\nEvidence: [loss](results/pretrain/loss.parquet)")
        (problem,) = check_questions(text, root=repo)
        assert "manifest.json is not valid JSON" in problem

    def test_bad_status_fails(self, repo: Path) -> None:
        problems = check_questions(_log("### Q1. Done?\nStatus: DONE"), root=repo)
        assert len(problems) == 1 and "DONE" in problems[0]

    def test_missing_status_fails(self, repo: Path) -> None:
        assert len(check_questions(_log("### Q1. No status?"), root=repo)) == 1

    def test_duplicate_id_fails(self, repo: Path) -> None:
        problems = check_questions(_log("### Q1. A?\nStatus: OPEN", "### Q1. B?\nStatus: OPEN"), root=repo)
        assert len(problems) == 1 and "duplicate" in problems[0]

    def test_malformed_heading_fails(self, repo: Path) -> None:
        problems = check_questions(_log("### Q1 missing the dot\nStatus: OPEN"), root=repo)
        assert len(problems) == 1 and "### Qn." in problems[0]


class TestMain:
    """python -m lab.questions: exit status and one line per problem."""

    def test_exit_codes(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        bad = tmp_path / "QUESTIONS.md"
        bad.write_text(_log("### Q1. A?\nStatus: ANSWERED", "### Q2. B?\nStatus: MAYBE"))
        assert main([str(bad)]) == 1
        assert len(capsys.readouterr().out.strip().splitlines()) == 2
        assert main([]) == 0  # the real log


class TestEncoding:
    """A log that is not UTF-8 stops the check with the file and the byte offset, not a UnicodeDecodeError."""

    def test_non_utf8_names_the_offset(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        log = tmp_path / "QUESTIONS.md"
        text = _log("### Q1. A?\nStatus: OPEN").encode()
        log.write_bytes(text[:20] + b"\xff\xfe" + text[20:])
        with pytest.raises(LabError, match=r"QUESTIONS.md is not UTF-8 text \(byte 0xff at offset 20\): re-save"):
            check_evidence(log, root=tmp_path)
        assert main([str(log)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "offset 20" in err[0]
