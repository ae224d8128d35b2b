"""The questions log: the real QUESTIONS.md is clean, and each kind of problem is caught."""

from __future__ import annotations

from pathlib import Path

import pytest

from lab.paths import REPO_ROOT
from lab.site.questions import STATUSES, check_evidence, check_questions, main, parse_questions


def _log(*entries: str) -> str:
    return "# Questions\n\n## Training dynamics\n\n" + "\n\n".join(entries) + "\n"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A fake repository with one result file and one page that evidence can point at."""
    (tmp_path / "results" / "pretrain").mkdir(parents=True)
    (tmp_path / "results" / "pretrain" / "loss.parquet").write_bytes(b"PAR1")
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
