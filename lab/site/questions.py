"""The questions log (``QUESTIONS.md``): parse it and check that every ANSWERED question links to evidence.

Format of one question::

    ### Q7. What do Adam's moments look like during fine-tuning?
    Status: ANSWERED
    Evidence: [moments](results/<track>/moments.parquet), [page](site-src/tracks/<track>.md)

Evidence must lie inside the repository, and evidence in ``results/`` must pass the checks the site applies before
it publishes a file (:func:`lab.site.checks.check_result_file`: readable, finite, its sha256 as the manifest records).

Run ``lab questions`` (or ``python -m lab.site.questions [PATH]``): prints one line per problem and exits 1, or exits 0
when clean.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lab.errors import LabError
from lab.paths import REPO_ROOT, shown
from lab.site.checks import RESULT_SUFFIXES, check_result_file

STATUSES = ("OPEN", "EXPLORING", "ANSWERED", "SUPERSEDED")

_SECTION_RE = re.compile(r"^##\s+(?P<title>.+?)\s*$")
_H3_RE = re.compile(r"^###\s+(?P<rest>.*?)\s*$")
_QUESTION_RE = re.compile(r"^(?P<id>Q(?P<number>\d+))\.\s+(?P<title>\S.*)$")
_STATUS_RE = re.compile(r"^Status:\s*(?P<status>\S*)\s*$")
_EVIDENCE_RE = re.compile(r"^Evidence:\s*(?P<links>.*)$")
_LINK_RE = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
_EXTERNAL_RE = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)


@dataclass
class Question:
    """One ``### Qn.`` entry of the log."""

    id: str
    number: int
    title: str
    section: str
    line: int  # 1-based line of the heading
    status: str | None = None
    evidence: list[str] = field(default_factory=list)  # link targets on the Evidence: line
    problems: list[str] = field(default_factory=list)  # format problems found while parsing


def parse_questions(text: str) -> list[Question]:
    """Parse the log into questions; malformed headings are kept with a problem noted."""
    questions: list[Question] = []
    section = ""
    current: Question | None = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if m := _SECTION_RE.match(line):
            section, current = m["title"], None
        elif m := _H3_RE.match(line):
            q = _QUESTION_RE.match(m["rest"])
            if q:
                current = Question(id=q["id"], number=int(q["number"]), title=q["title"], section=section, line=lineno)
            else:
                current = Question(id=f"line {lineno}", number=-1, title=m["rest"], section=section, line=lineno)
                current.problems.append(f"heading {m['rest']!r} is not in the form '### Qn. question'")
            questions.append(current)
        elif current is not None and (m := _STATUS_RE.match(line)):
            if current.status is not None:
                current.problems.append("has more than one Status: line")
            current.status = m["status"]
        elif current is not None and (m := _EVIDENCE_RE.match(line)):
            current.evidence += [link["target"] for link in _LINK_RE.finditer(m["links"])]
    return questions


def check_questions(text: str, root: Path = REPO_ROOT, source: str = "QUESTIONS.md") -> list[str]:
    """Problems in a log's text; links are resolved against ``root`` (the repository)."""
    problems: list[str] = []
    seen: dict[str, int] = {}
    questions = parse_questions(text)
    if not questions:
        problems.append(f"{source}: no questions found (expected '### Qn. question' headings)")
    for q in questions:
        where = f"{source}:{q.line}: {q.id}"
        problems += [f"{where}: {p}" for p in q.problems]
        if q.number >= 0:
            if q.id in seen:
                problems.append(f"{where}: duplicate id (first used on line {seen[q.id]})")
            seen.setdefault(q.id, q.line)
        if q.status is None:
            problems.append(f"{where}: no 'Status:' line (one of {', '.join(STATUSES)})")
        elif q.status not in STATUSES:
            problems.append(f"{where}: unknown status {q.status!r} (use one of {', '.join(STATUSES)})")
        local = [t for t in q.evidence if not _EXTERNAL_RE.match(t) and not t.startswith("#")]
        if q.status == "ANSWERED" and not local:
            problems.append(f"{where}: ANSWERED but no 'Evidence:' link to a file in the repository")
        for target in local:
            if problem := _evidence_problem(target.split("#", 1)[0], root):
                problems.append(f"{where}: evidence {target!r} {problem}")
    return problems


def _evidence_problem(path: str, root: Path) -> str | None:
    """Why one evidence path is not acceptable, or None: outside the repository, missing, or a damaged result."""
    target = root / path
    try:
        target.resolve().relative_to(root.resolve())
    except ValueError:
        return "lies outside the repository: link to a file inside it"
    if not target.exists():
        return "does not exist"
    if target.is_file() and target.name.endswith(RESULT_SUFFIXES):
        if problem := check_result_file(target):
            return f"fails its check: {problem}"
    return None


def check_evidence(path: Path | None = None, root: Path | None = None) -> list[str]:
    """Problems in the questions log at ``path`` (default ``QUESTIONS.md`` of the repo); empty when clean."""
    root = Path(root) if root is not None else REPO_ROOT
    path = Path(path) if path is not None else root / "QUESTIONS.md"
    if not path.exists():
        return [f"{path}: missing"]
    return check_questions(read_log(path), root=root, source=path.name)


def read_log(path: Path) -> str:
    """The log's text; :class:`LabError` naming the file and the first byte that is not UTF-8."""
    try:
        return Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise LabError(
            f"{shown(path)} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}): re-save it as UTF-8"
        ) from None
    except OSError as e:
        raise LabError(f"{shown(path)} cannot be read ({e.strerror or e}): check that it is a readable file") from None


def main(argv: list[str] | None = None) -> int:
    """``python -m lab.site.questions [PATH]``: one line per problem, exit status 1 if any."""
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else None
    try:
        problems = check_evidence(path)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for p in problems:
        print(p)
    if not problems:
        n = len(parse_questions(read_log(path or REPO_ROOT / "QUESTIONS.md")))
        print(f"{path or 'QUESTIONS.md'}: {n} questions, evidence OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
