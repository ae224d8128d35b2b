"""The site: macros read results files, the strict build passes on fixture results and fails clearly without them."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin

import altair as alt
import polars as pl
import pytest

from lab.errors import LabError
from lab.results import write_result

# Every result the committed pages reference, with values chosen so their formatted forms are unambiguous.
SUMMARY = {
    "final_val_loss": 1.98765,
    "final_train_loss": 1.87654,
    "best_val_loss": 1.97531,
    "iters": 2000,
    "tokens_seen": 1_536_000,
    "n_params": 812_345,
    "wall_time_s": 123.4,
    "tokens_per_s": 12_447.3,
    "vocab_size": 83,
}
SAMPLES = {
    "step": [0, 2000],
    "text": ["x|y\nsecond line <b> *not em* $no math$ layer(s) [...] \\(x\\)", "ROMEO.\nWhat light?"],
}


def _line_chart(y: str) -> Callable[[pl.DataFrame], alt.Chart]:
    return lambda f: alt.Chart(f).mark_line().encode(x="step:Q", y=f"{y}:Q").properties(title=y)


def write_fixture_results(root: Path) -> None:
    """Write small versions of every result the site's pages use into ``root`` (a LAB_RESULTS_DIR)."""
    kw = dict(config={"n_layer": 4, "d_model": 128}, seed=1337, profile="cpu", wall_time_s=1.25, root=root)
    steps = [0, 250, 500, 750, 1000]
    loss = pl.DataFrame(
        {
            "step": steps * 2,
            "split": ["train"] * 5 + ["val"] * 5,
            "loss": [4.4, 2.6, 2.3, 2.1, 2.0, 4.4, 2.7, 2.4, 2.2, 2.1],
        }
    )
    chart = lambda f: alt.Chart(f).mark_line().encode(x="step:Q", y="loss:Q", color="split:N")  # noqa: E731
    write_result("pretrain", "loss", loss, chart=chart, **kw)
    log = pl.DataFrame({"step": steps, "lr": [1e-4, 1e-3, 8e-4, 4e-4, 1e-4], "grad_norm": [3.0, 1.2, 0.9, 0.8, 0.7]})
    write_result("pretrain", "log", log, chart=_line_chart("lr"), **kw)
    write_result("pretrain", "summary", pl.DataFrame({k: [v] for k, v in SUMMARY.items()}), **kw)
    write_result("pretrain", "samples", pl.DataFrame(SAMPLES), **kw)
    bench = pl.DataFrame({"loop": ["eager", "compiled"], "tokens_per_s": [12000.0, 15000.0], "ratio": [1.0, 1.25]})
    write_result("pretrain", "benchmark", bench, **kw)


@pytest.fixture(scope="module")
def fixture_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("results")
    write_fixture_results(root)
    return root


@pytest.fixture
def results_env(fixture_results: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LAB_RESULTS_DIR", str(fixture_results))
    return fixture_results


@pytest.fixture(scope="module")
def built_site(smoke_results: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from lab.site.build import build_site

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LAB_RESULTS_DIR", str(smoke_results))
        yield build_site(site_dir=tmp_path_factory.mktemp("built") / "site", strict=True)


class _Tags(HTMLParser):
    """Collects (tag, attrs) pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Tags()
    parser.feed(html)
    return parser.tags


class TestBuild:
    """mkdocs build --strict against fixture results."""

    def test_values_come_from_the_parquet(self, built_site: Path, smoke_results: Path) -> None:
        page = (built_site / "tracks" / "pretrain" / "index.html").read_text()
        summary = pl.read_parquet(smoke_results / "pretrain" / "summary.parquet").row(-1, named=True)
        for expected in (
            f"{summary['final_val_loss']:.3f}",
            f"{summary['final_train_loss']:.3f}",
            f"{summary['tokens_seen']:,}",
            f"{summary['n_params']:,}",
        ):
            assert f">{expected}<" in page, expected

    def test_charts_point_at_specs_in_the_site(self, built_site: Path, smoke_results: Path) -> None:
        from lab.paths import REPO_ROOT

        n_macros = (REPO_ROOT / "site-src" / "tracks" / "pretrain.md").read_text().count("{{ chart(")
        page = built_site / "tracks" / "pretrain" / "index.html"
        specs = [a["data-spec"] for tag, a in _tags(page.read_text()) if "data-spec" in a]
        assert len(specs) == n_macros >= 2
        for spec_url in specs:
            target = Path(urljoin(page.as_uri(), spec_url).removeprefix("file://"))
            assert target.is_file(), spec_url
            name = target.name.removesuffix(".vl.json")
            assert json.loads(target.read_text()) == json.loads(
                (smoke_results / "pretrain" / f"{name}.vl.json").read_text()
            )
        assert page.read_text().count('<figure class="lab-chart">') == n_macros

    def test_result_data_is_published(self, built_site: Path, smoke_results: Path) -> None:
        for name in ("summary.parquet", "loss.parquet", "manifest.json"):
            assert (built_site / "results" / "pretrain" / name).read_bytes() == (
                smoke_results / "pretrain" / name
            ).read_bytes()

    def test_provenance_block(self, built_site: Path, smoke_results: Path) -> None:
        page = (built_site / "tracks" / "pretrain" / "index.html").read_text()
        record = json.loads((smoke_results / "pretrain" / "manifest.json").read_text())["summary"]
        assert record["git_commit"] in page
        assert "<code>1337</code>" in page

    def test_questions_page(self, built_site: Path) -> None:
        from lab.paths import REPO_ROOT
        from lab.site.questions import parse_questions

        questions = parse_questions((REPO_ROOT / "QUESTIONS.md").read_text())
        page = (built_site / "questions" / "index.html").read_text()
        for q in questions:
            assert f'<h3 id="{q.id.lower()}">' in page
        hrefs = [a.get("href") or "" for tag, a in _tags(page) if tag == "a"]
        assert "../tracks/pretrain/" in hrefs  # QUESTIONS.md's `site-src/tracks/pretrain.md` link, rewritten
        assert not [h for h in hrefs if "site-src" in h or h.endswith(".md")]

    def test_math_is_left_for_katex(self, built_site: Path) -> None:
        page = (built_site / "tracks" / "pretrain" / "index.html").read_text()
        assert re.search(r'<div class="arithmatex">\\\[.*\\log p_\\theta', page, re.S)

    def test_blog_index_and_posts(self, built_site: Path) -> None:
        import yaml

        from lab.paths import REPO_ROOT

        index = built_site / "blog" / "index.html"
        assert index.is_file()
        home_hrefs = [a.get("href") for tag, a in _tags((built_site / "index.html").read_text()) if tag == "a"]
        assert "blog/" in home_hrefs  # in the navigation, with the plugin's archive and category pages
        assert any(h.startswith("blog/archive/") for h in home_hrefs if h)
        assert any(h.startswith("blog/category/") for h in home_hrefs if h)
        index_hrefs = {a.get("href") for tag, a in _tags(index.read_text()) if tag == "a"}
        posts = sorted((REPO_ROOT / "site-src" / "blog" / "posts").glob("*.md"))
        assert "circuits-during-finetuning.md" in [p.name for p in posts]
        for src in posts:
            meta = yaml.safe_load(src.read_text().split("---\n")[1])
            assert meta.get("slug"), f"{src.name}: set `slug:` so the post's URL does not follow its title"
            url = f"{meta['date']:%Y/%m/%d}/{meta['slug']}/"
            page = built_site / "blog" / url / "index.html"
            assert page.is_file(), url
            assert url in index_hrefs  # listed on the blog index
            html = page.read_text()
            assert "{{" not in html, f"{url}: a result macro was left unexpanded"
            for category in meta.get("categories", []):
                assert (built_site / "blog" / "category" / category.lower() / "index.html").is_file()
        post = (built_site / "blog" / "2026" / "11" / "22" / "circuits-during-finetuning" / "index.html").read_text()
        assert '<h1 id="watching-a-small-model-learn-invented-words">' in post

    def test_no_external_assets(self, built_site: Path) -> None:
        for html in built_site.rglob("*.html"):
            for tag, attrs in _tags(html.read_text()):
                fetched = tag == "link" and attrs.get("rel") not in ("canonical", "alternate")
                url = attrs.get("src") if tag in ("script", "img", "iframe") else attrs.get("href") if fetched else None
                assert not (url or "").startswith(("http:", "https:", "//")), f"{html}: {tag} {url}"


class TestFailures:
    """Missing inputs stop the build with the fix in the message."""

    def test_missing_chart_names_the_command(
        self, smoke_results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        from lab.site.build import build_site

        partial = tmp_path / "results"
        shutil.copytree(smoke_results, partial)
        (partial / "pretrain" / "loss.vl.json").unlink()  # and from the manifest: a chart the track never drew
        manifest = json.loads((partial / "pretrain" / "manifest.json").read_text())
        manifest["loss"]["files"].remove("loss.vl.json")
        (partial / "pretrain" / "manifest.json").write_text(json.dumps(manifest))
        monkeypatch.setenv("LAB_RESULTS_DIR", str(partial))
        with pytest.raises(LabError, match=r"loss\.vl\.json.*lab run pretrain --profile cpu"):
            build_site(site_dir=tmp_path / "site")

    def test_non_utf8_questions_log_is_one_line(
        self, results_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import lab.site.hooks as hooks
        from lab.site.build import build_site

        log = tmp_path / "QUESTIONS.md"
        data = b"# Questions\n\n### Q1. Caf\xe9?\nStatus: OPEN\n"
        log.write_bytes(data)
        monkeypatch.setattr(hooks, "QUESTIONS_FILE", log)
        offset = data.index(b"\xe9")
        with pytest.raises(LabError, match=rf"QUESTIONS.md is not UTF-8 text \(byte 0xe9 at offset {offset}\)") as e:
            build_site(site_dir=tmp_path / "site")
        assert len(str(e.value).splitlines()) == 1

    def test_missing_vendor_js_says_run_setup(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import lab.site.build

        monkeypatch.setattr(lab.site.build, "VENDOR_DIR", tmp_path / "vendor")
        with pytest.raises(LabError, match=r"\./\.ci/setup"):
            lab.site.build.build_site(site_dir=tmp_path / "site")


class TestPublicationChecks:
    """The build checks every result file it would publish and refuses with one line per problem, naming the file
    and the fix, before mkdocs runs (so no traceback and no site/)."""

    @pytest.fixture
    def results(self, fixture_results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
        copy = tmp_path / "results"
        shutil.copytree(fixture_results, copy)
        monkeypatch.setenv("LAB_RESULTS_DIR", str(copy))
        return copy

    def _refusal(self, tmp_path: Path) -> list[str]:
        from lab.site.build import build_site

        with pytest.raises(LabError) as e:
            build_site(site_dir=tmp_path / "site")
        assert not (tmp_path / "site").exists()
        return str(e.value).splitlines()

    def test_committed_results_pass(self) -> None:
        from lab.paths import REPO_ROOT
        from lab.site.checks import check_results
        from lab.site.hooks import SKIPPED_PROFILES

        assert check_results(REPO_ROOT / "results", skip=SKIPPED_PROFILES) == []

    def test_fixture_results_pass(self, results: Path) -> None:
        from lab.site.checks import check_results

        assert check_results(results) == []

    @pytest.mark.parametrize(
        "file, damage, expected",
        [
            ("loss.parquet", lambda b: b"not parquet at all", "loss.parquet is not readable Parquet"),
            ("summary.parquet", lambda b: b[: len(b) // 2], "summary.parquet is not readable Parquet"),
            ("loss.vl.json", lambda b: b[: len(b) // 2], "loss.vl.json is not readable Vega-Lite JSON"),
            ("loss.vl.json", lambda b: b.replace(b"2.6", b"NaN", 1), "loss.vl.json holds NaN"),
            ("manifest.json", lambda b: b[: len(b) // 2], "manifest.json is not valid JSON"),
        ],
    )
    def test_damaged_file(self, results: Path, tmp_path: Path, file: str, damage, expected: str) -> None:
        path = results / "pretrain" / file
        path.write_bytes(damage(path.read_bytes()))
        lines = self._refusal(tmp_path)
        assert len(lines) == 1
        assert expected in lines[0] and "rerun `lab run pretrain`" in lines[0]

    def test_every_problem_is_listed(self, results: Path, tmp_path: Path) -> None:
        (results / "pretrain" / "summary.parquet").write_bytes(b"PAR1")
        (results / "pretrain" / "loss.vl.json").write_text("{")
        (results / "pretrain" / "samples.parquet").unlink()
        lines = self._refusal(tmp_path)
        assert len(lines) == 3
        assert [line.split(" ")[0].rsplit("/", 1)[-1] for line in lines] == [
            "loss.vl.json",
            "summary.parquet",
            "manifest.json",  # lists samples.parquet, which is missing
        ]

    def test_changed_bytes_fail_the_sha256(self, results: Path, tmp_path: Path) -> None:
        """A readable Parquet file that is not the one written: only the manifest's hash can tell."""
        pl.DataFrame({"step": [0], "loss": [9.9]}).write_parquet(results / "pretrain" / "loss.parquet")
        (line,) = self._refusal(tmp_path)
        assert "loss.parquet differs from the sha256" in line and "rerun `lab run pretrain`" in line

    def test_unlisted_file(self, results: Path, tmp_path: Path) -> None:
        pl.DataFrame({"x": [1]}).write_parquet(results / "pretrain" / "extra.parquet")
        (line,) = self._refusal(tmp_path)
        assert "extra.parquet is not listed in" in line and "delete the file" in line

    def test_manifest_without_checksums(self, results: Path, tmp_path: Path) -> None:
        path = results / "pretrain" / "manifest.json"
        manifest = json.loads(path.read_text())
        del manifest["loss"]["sha256"]
        path.write_text(json.dumps(manifest))
        lines = self._refusal(tmp_path)
        assert len(lines) == 2 and all("no sha256" in line for line in lines)  # loss.parquet and loss.vl.json

    def test_symlink_is_refused(self, results: Path, tmp_path: Path) -> None:
        (results / "pretrain" / "passwd.parquet").symlink_to("/etc/passwd")
        (results / "linked").symlink_to("/etc", target_is_directory=True)
        lines = self._refusal(tmp_path)
        assert len(lines) == 2 and all("is a symbolic link" in line and "delete the link" in line for line in lines)
        assert f"{results}/pretrain/passwd.parquet is a symbolic link (to /etc/passwd)" in lines[1]

    def test_hidden_entries_are_neither_checked_nor_published(self, results: Path) -> None:
        """A run's stage and an atomic write's temporary are not results."""
        from lab.site.checks import check_results
        from lab.site.hooks import published_results

        (results / ".pretrain.12345.tmp").mkdir()
        (results / ".pretrain.12345.tmp" / "loss.parquet").write_bytes(b"partial")
        (results / "pretrain" / ".loss.parquet.abc.tmp").write_bytes(b"partial")
        assert check_results(results) == []
        assert not [p for p in published_results(results) if "tmp" in p.name or "tmp" in p.parent.name]

    def test_damaged_parquet_in_a_macro_is_one_line(self, results_env: Path, tmp_path: Path) -> None:
        """Outside the build's check (mkdocs serve, a direct macro call), a damaged file still names its fix."""
        from lab.site.hooks import expand_macros

        shutil.copytree(results_env, tmp_path / "r")
        (tmp_path / "r" / "pretrain" / "summary.parquet").write_bytes(b"PAR1 garbage PAR1")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LAB_RESULTS_DIR", str(tmp_path / "r"))
            with pytest.raises(LabError, match="summary.parquet is not readable Parquet.*rerun `lab run pretrain`"):
                expand_macros('{{ value("pretrain/summary", "iters") }}', "")


class TestMacros:
    """The macro expander on its own."""

    def test_value_and_missing_column(self, results_env: Path) -> None:
        from lab.site.hooks import expand_macros

        md = (
            'Loss {{ value("pretrain/summary", "best_val_loss", ".2f") }}, iters {{value("pretrain/summary","iters")}}.'
        )
        assert (
            expand_macros(md, "tracks/pretrain/") == f"Loss {SUMMARY['best_val_loss']:.2f}, iters {SUMMARY['iters']}."
        )
        with pytest.raises(LabError, match="no column 'nope'.*final_val_loss"):
            expand_macros('{{ value("pretrain/summary", "nope") }}', "")

    def test_missing_parquet_names_the_command(self, results_env: Path) -> None:
        from lab.site.hooks import expand_macros

        with pytest.raises(LabError, match=r"lab run C_probing --profile cpu"):
            expand_macros('{{ table("C_probing/logit_lens") }}', "")

    def test_chart_url_is_relative_to_the_page(self, results_env: Path) -> None:
        from lab.site.hooks import expand_macros

        assert 'data-spec="results/pretrain/loss.vl.json"' in expand_macros('{{ chart("pretrain/loss", "c") }}', "")
        assert 'data-spec="../../results/pretrain/loss.vl.json"' in expand_macros(
            '{{ chart("pretrain/loss", "c") }}', "tracks/pretrain/"
        )

    def test_samples_table_escapes_text(self, results_env: Path) -> None:
        import markdown

        from lab.site.hooks import expand_macros

        html = markdown.markdown(
            expand_macros('{{ table("pretrain/samples", columns=["step", "text"]) }}', ""),
            extensions=["tables", "pymdownx.arithmatex"],
            extension_configs={"pymdownx.arithmatex": {"generic": True}},
        )  # as mkdocs.yml
        import html as html_lib

        cells = [html_lib.unescape(c) for c in re.findall(r"<td>(.*?)</td>", html, re.S)]
        # What the reader sees is the text itself: no markup, no emphasis, no math typeset.
        assert cells == ["x|y<br>second line <b> *not em* $no math$ layer(s) [...] \\(x\\)", "ROMEO.<br>What light?"]
        assert "arithmatex" not in html and "<em>" not in html

    def test_table_columns_and_rows(self, results_env: Path) -> None:
        from lab.site.hooks import expand_macros

        out = expand_macros('{{ table("pretrain/benchmark", columns=["loop", "ratio"], max_rows=1) }}', "").strip()
        assert out.splitlines() == ["| loop | ratio |", "| --- | ---: |", "| eager | 1 |"]

    def test_code_and_comments_are_left_alone(self, results_env: Path) -> None:
        from lab.site.hooks import expand_macros

        md = '`{{ value("x/y", "z") }}`\n\n```md\n{{ chart("x/y") }}\n```\n\n<!-- {{ value("x/y", "z") }} -->\n'
        assert expand_macros(md, "") == md

    def test_unknown_macro_and_bad_arguments(self, results_env: Path) -> None:
        from lab.site.hooks import expand_macros

        with pytest.raises(LabError, match="unknown macro"):
            expand_macros('{{ plot("pretrain/loss") }}', "")
        with pytest.raises(LabError, match="literals"):
            expand_macros("{{ value(pretrain/summary) }}", "")


class TestRepoPages:
    """QUESTIONS.md and docs/ become pages with working links."""

    def test_rewrite_repo_links(self) -> None:
        from lab.site.hooks import rewrite_repo_links

        md = (
            "[a](site-src/tracks/pretrain.md#results) [b](results/pretrain/loss.parquet) "
            "[c](https://x.org/a.md) [d](docs/blog.md)"
        )
        assert rewrite_repo_links(md, "QUESTIONS.md", "questions.md") == (
            "[a](tracks/pretrain.md#results) [b](results/pretrain/loss.parquet) "
            "[c](https://x.org/a.md) [d](docs/blog.md)"
        )
        # From a docs page one folder down, links written relative to that file in the repo.
        assert rewrite_repo_links(
            "[a](../../site-src/index.md) [q](../../QUESTIONS.md#q1)", "docs/notes/x.md", "docs/notes/x.md"
        ) == ("[a](../../index.md) [q](../../questions.md#q1)")

    def test_docs_pages_are_built_with_working_links(
        self, smoke_results: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        import lab.site.hooks as hooks
        from lab.site.build import build_site

        monkeypatch.setenv("LAB_RESULTS_DIR", str(smoke_results))
        docs = tmp_path / "docs"
        if hooks.DOCS_DIR.exists():  # the real pages link to the real notes: keep them, add the test's own
            shutil.copytree(hooks.DOCS_DIR, docs)
        (docs / "papers").mkdir(parents=True, exist_ok=True)
        (docs / "blog.md").write_text("# Blog post\n\nSee [the page](../site-src/tracks/pretrain.md#results).\n")
        (docs / "papers" / "bayes.md").write_text(
            "# Bayes notes\n\n[data](../../results/pretrain/loss.parquet) and [Q14](../../QUESTIONS.md#q14)\n"
        )
        monkeypatch.setattr(hooks, "DOCS_DIR", docs)
        site = build_site(site_dir=tmp_path / "site", strict=True)  # strict: every rewritten link resolves
        blog = (site / "docs" / "blog" / "index.html").read_text()
        assert 'href="../../tracks/pretrain/#results"' in blog
        bayes = (site / "docs" / "papers" / "bayes" / "index.html").read_text()
        assert 'href="../../../results/pretrain/loss.parquet"' in bayes
        assert 'href="../../../questions/#q14"' in bayes
        home = (site / "index.html").read_text()
        assert "Notes" in home and "Bayes notes" in home  # appended to the navigation, titled by heading

    def test_empty_docs_folder_is_fine(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import lab.site.hooks as hooks

        monkeypatch.setattr(hooks, "DOCS_DIR", tmp_path / "absent")
        assert hooks._docs_files() == []
