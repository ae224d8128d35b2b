"""The site: macros read results files, claims are checked against the data, captions against their charts, the
strict build passes on the smoke run's results and fails clearly (naming the page) without them."""

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

# Every result the macro tests reference, with values chosen so their formatted forms are unambiguous.
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
SEEDS = {"model": ["transformer"] * 3 + ["mlp"], "seed": [0, 1, 2, 0], "mae_bits": [0.0099, 0.0113, 0.0109, 1.107]}


def _line_chart(y: str) -> Callable[[pl.DataFrame], alt.Chart]:
    return lambda f: alt.Chart(f).mark_line().encode(x="step:Q", y=f"{y}:Q").properties(title=y)


def write_fixture_results(root: Path) -> None:
    """Write small results into ``root`` (a LAB_RESULTS_DIR), recorded as the ``cpu`` profile's (so claims on them
    are checked), plus one result recorded as the ``smoke`` profile's."""
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
    dashed = lambda f: (  # noqa: E731  B's per-layer chart: colour and dash by series
        alt.Chart(f).mark_line().encode(x="step:Q", y="loss:Q", color="split:N", strokeDash="split:N")
    )
    write_result("pretrain", "loss_dashed", loss, chart=dashed, **kw)
    log = pl.DataFrame({"step": steps, "lr": [1e-4, 1e-3, 8e-4, 4e-4, 1e-4], "grad_norm": [3.0, 1.2, 0.9, 0.8, 0.7]})
    write_result("pretrain", "log", log, chart=_line_chart("lr"), **kw)
    write_result("pretrain", "summary", pl.DataFrame({k: [v] for k, v in SUMMARY.items()}), **kw)
    write_result("pretrain", "samples", pl.DataFrame(SAMPLES), **kw)
    bench = pl.DataFrame({"loop": ["eager", "compiled"], "tokens_per_s": [12000.0, 15000.0], "ratio": [1.0, 1.25]})
    write_result("pretrain", "benchmark", bench, **kw)
    write_result("pretrain", "seeds", pl.DataFrame(SEEDS), **kw)
    write_result("pretrain", "smoke_summary", pl.DataFrame({"final_val_loss": [4.1]}), **{**kw, "profile": "smoke"})


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


@pytest.fixture
def mini_site(results_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Path]:
    """Build a one-page site (the real mkdocs.yml, hooks, macros and plugins; ``text`` as its only page) on the
    fixture results; returns the built site folder or raises the build's LabError."""
    import lab.site.hooks as hooks
    from lab.paths import REPO_ROOT
    from lab.site.build import build_site

    monkeypatch.setattr(hooks, "DOCS_DIR", tmp_path / "no-docs")
    monkeypatch.setattr(hooks, "QUESTIONS_FILE", tmp_path / "no-questions.md")
    docs = tmp_path / "pages"
    docs.mkdir()
    (docs / "assets").symlink_to(REPO_ROOT / "site-src" / "assets", target_is_directory=True)

    def build(text: str) -> Path:
        (docs / "index.md").write_text(text)
        return build_site(site_dir=tmp_path / "site", docs_dir=str(docs), nav=[{"Home": "index.md"}])

    return build


def render(markdown: str, src_uri: str = "tracks/pretrain.md", url: str | None = None) -> str:
    from lab.site.macros import render as render_page

    return render_page(markdown, src_uri, url)


class _Tags(HTMLParser):
    """Collects (tag, attrs) pairs, and the text of each ``script`` element."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self._in_script: dict[str, str | None] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._in_script = dict(attrs)
            self.scripts.append((self._in_script, ""))

    def handle_data(self, data: str) -> None:
        if self._in_script is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = None


def _parse(html: str) -> _Tags:
    parser = _Tags()
    parser.feed(html)
    return parser


def _tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    return _parse(html).tags


def _registered_spec(script: str, key: str) -> dict:
    """The spec a ``.vl.js`` file registers as ``window.LabSpecs[key]``."""
    head = f"window.LabSpecs = window.LabSpecs || {{}};\nwindow.LabSpecs[{json.dumps(key)}] = "
    tail = f";\nif (window.labChartLoaded) window.labChartLoaded({json.dumps(key)});\n"
    assert script.startswith(head) and script.endswith(tail)
    return json.loads(script[len(head) : -len(tail)])


class TestBuild:
    """mkdocs build --strict against the smoke run's results."""

    def test_values_come_from_the_parquet(self, built_site: Path, smoke_results: Path) -> None:
        page = (built_site / "tracks" / "pretrain.html").read_text()
        summary = pl.read_parquet(smoke_results / "pretrain" / "summary.parquet").row(-1, named=True)
        for expected in (
            f"{summary['final_val_loss']:.3f}",
            f"{summary['final_train_loss']:.3f}",
            f"{summary['tokens_seen']:,}",
            f"{summary['n_params']:,}",
        ):
            assert f">{expected}<" in page, expected

    def test_charts_load_their_spec_as_a_script(self, built_site: Path, smoke_results: Path) -> None:
        """Each chart's spec comes with the page as a script (a fetch would fail from file://), unchanged."""
        from lab.paths import REPO_ROOT

        n_macros = (REPO_ROOT / "site-src" / "tracks" / "pretrain.md").read_text().count("{{ chart(")
        page = built_site / "tracks" / "pretrain.html"
        parsed = _parse(page.read_text())
        keys = [a["data-spec"] for tag, a in parsed.tags if "data-spec" in a]
        scripts = [a["src"] for a, _ in parsed.scripts if (a.get("src") or "").endswith(".vl.js")]
        assert len(keys) == len(scripts) == n_macros >= 2
        for key, src in zip(keys, scripts, strict=True):
            script = Path(urljoin(page.as_uri(), src).removeprefix("file://"))
            assert script == built_site / key.replace(".vl.json", ".vl.js")
            assert _registered_spec(script.read_text(), key) == json.loads((smoke_results / key[8:]).read_text())
            assert (built_site / key).read_bytes() == (smoke_results / key[8:]).read_bytes()  # the spec, linked
        assert page.read_text().count('<figure class="lab-chart">') == n_macros

    def test_result_data_is_published_with_a_csv(self, built_site: Path, smoke_results: Path) -> None:
        for name in ("summary.parquet", "loss.parquet", "manifest.json"):
            assert (built_site / "results" / "pretrain" / name).read_bytes() == (
                smoke_results / "pretrain" / name
            ).read_bytes()
        for parquet in (smoke_results / "pretrain").glob("*.parquet"):
            csv = built_site / "results" / "pretrain" / f"{parquet.stem}.csv"
            frame = pl.read_parquet(parquet)
            back = pl.read_csv(csv, schema=frame.schema) if csv.stat().st_size else pl.DataFrame()
            assert back.equals(frame), csv.name
        assert not list(smoke_results.rglob("*.csv"))  # written in the built site only

    def test_tables_link_their_full_data(self, built_site: Path) -> None:
        page = built_site / "tracks" / "pretrain.html"
        hrefs = [a["href"] for tag, a in _tags(page.read_text()) if tag == "a" and a.get("href")]
        assert "../results/pretrain/samples.parquet" in hrefs and "../results/pretrain/samples.csv" in hrefs
        for href in hrefs:
            if href.startswith("../results/"):
                assert (page.parent / href).resolve().is_file(), href

    def test_provenance_block(self, built_site: Path, smoke_results: Path) -> None:
        page = (built_site / "tracks" / "pretrain.html").read_text()
        record = json.loads((smoke_results / "pretrain" / "manifest.json").read_text())["summary"]
        assert record["git_commit"] in page
        assert "<code>1337</code>" in page

    def test_questions_page(self, built_site: Path) -> None:
        from lab.paths import REPO_ROOT
        from lab.site.questions import parse_questions

        questions = parse_questions((REPO_ROOT / "QUESTIONS.md").read_text())
        page = (built_site / "questions.html").read_text()
        for q in questions:
            assert f'<h3 id="{q.id.lower()}">' in page
        hrefs = [a.get("href") or "" for tag, a in _tags(page) if tag == "a"]
        assert "tracks/pretrain.html" in hrefs  # QUESTIONS.md's `site-src/tracks/pretrain.md` link, rewritten
        assert not [h for h in hrefs if "site-src" in h or h.endswith(".md")]

    def test_plain_html_links(self, built_site: Path) -> None:
        """Opened from disk a link to a folder shows a listing: every internal page link names an .html file."""
        for html in [built_site / "index.html", built_site / "tracks" / "B_attention.html"]:
            for tag, attrs in _tags(html.read_text()):
                href = (attrs.get("href") or "").split("#")[0]
                if tag == "a" and href and not re.match(r"^[a-z]+:", href):
                    assert not href.endswith("/"), f"{html.name}: {href}"
                    assert (html.parent / href).resolve().exists(), f"{html.name}: {href}"

    def test_math_is_left_for_katex(self, built_site: Path) -> None:
        page = (built_site / "tracks" / "pretrain.html").read_text()
        assert re.search(r'<div class="arithmatex">\\\[.*\\log p_\\theta', page, re.S)

    def test_claims_render_unchecked_on_smoke_results(self, built_site: Path) -> None:
        """The smoke run's numbers cannot confirm or contradict the cpu run's headlines: they are marked, not
        checked, and the build passes."""
        for page in ["tracks/pretrain.html", "tracks/D_bayes.html"]:
            html = (built_site / page).read_text()
            assert html.count('class="lab-claim lab-claim--unchecked"') >= 3, page
            assert 'class="lab-claim"' not in html

    def test_blog_index_and_posts(self, built_site: Path) -> None:
        import yaml

        from lab.paths import REPO_ROOT

        index = built_site / "blog" / "index.html"
        assert index.is_file()
        home_hrefs = [a.get("href") for tag, a in _tags((built_site / "index.html").read_text()) if tag == "a"]
        assert "blog/index.html" in home_hrefs  # in the navigation, with the plugin's archive and category pages
        assert any(h.startswith("blog/archive/") for h in home_hrefs if h)
        assert any(h.startswith("blog/category/") for h in home_hrefs if h)
        index_hrefs = {a.get("href") for tag, a in _tags(index.read_text()) if tag == "a"}
        posts = sorted((REPO_ROOT / "site-src" / "blog" / "posts").glob("*.md"))
        assert "circuits-during-finetuning.md" in [p.name for p in posts]
        for src in posts:
            meta = yaml.safe_load(src.read_text().split("---\n")[1])
            assert meta.get("slug"), f"{src.name}: set `slug:` so the post's URL does not follow its title"
            url = f"{meta['date']:%Y/%m/%d}/{meta['slug']}.html"
            page = built_site / "blog" / url
            assert page.is_file(), url
            assert url in index_hrefs  # listed on the blog index
            html = page.read_text()
            assert "{{" not in html, f"{url}: a result macro was left unexpanded"
            for category in meta.get("categories", []):
                assert (built_site / "blog" / "category" / f"{category.lower()}.html").is_file()
        post = (built_site / "blog" / "2026" / "11" / "22" / "circuits-during-finetuning.html").read_text()
        assert '<h1 id="watching-a-small-model-learn-invented-words">' in post

    def test_no_external_assets(self, built_site: Path) -> None:
        for html in built_site.rglob("*.html"):
            for tag, attrs in _tags(html.read_text()):
                fetched = tag == "link" and attrs.get("rel") not in ("canonical", "alternate")
                url = attrs.get("src") if tag in ("script", "img", "iframe") else attrs.get("href") if fetched else None
                assert not (url or "").startswith(("http:", "https:", "//")), f"{html}: {tag} {url}"


class TestHeadlines:
    """Every track page and blog post states its headlines as checked claims."""

    PAGES = ["tracks/pretrain.md", "tracks/A_finetuning.md", "tracks/B_attention.md", "tracks/C_probing.md"]
    PAGES += ["tracks/D_bayes.md", "tracks/E_circuits.md", "blog/posts/circuits-during-finetuning.md"]
    # Learnings bullets that state no measured headline (what is left to do, what it cost, a reading of charts).
    NOT_HEADLINES = ("Follow-up", "Cost", "Three seeds, three divisions of labour")

    @pytest.mark.parametrize("page", PAGES)
    def test_every_learning_is_a_claim(self, page: str) -> None:
        from lab.paths import REPO_ROOT

        text = (REPO_ROOT / "site-src" / page).read_text()
        assert text.count("{{ claim(") >= 5, page
        if page.startswith("tracks/"):
            learnings = text.split("## Learnings", 1)[1]
            bullets = re.split(r"^- \*\*", learnings, flags=re.M)[1:]
            assert bullets
            for bullet in bullets:
                if not bullet.startswith(self.NOT_HEADLINES):
                    assert "claim(" in bullet, f"{page}: headline without a claim: {bullet[:60]!r}"


class TestClaims:
    """claim(): the sentence's numbers rendered, the build stopped when the committed data contradicts them."""

    def test_a_claim_that_holds_renders_its_numbers(self, results_env: Path) -> None:
        html = render(
            '{{ claim("pretrain/summary", "final_val_loss", "<", 2.5, fmt=".3f", says="{value}, below {target}") }}'
        )
        assert re.fullmatch(
            r'<span class="lab-claim" title="Checked when the site was built: [^"]*">1.988, below 2.5</span>', html
        )
        assert "final_val_loss = 1.98765" in html

    def test_a_contradicted_claim_names_the_claim_and_the_value(self, results_env: Path) -> None:
        with pytest.raises(LabError) as e:
            render('{{ claim("pretrain/summary", "final_val_loss", "<=", 1.5) }}', "tracks/D_bayes.md")
        message = str(e.value)
        assert message.startswith("page tracks/D_bayes.md: claim('pretrain/summary', 'final_val_loss', '<=', 1.5)")
        assert "does not hold: final_val_loss = 1.98765" in message and "stated ≤ 1.5" in message

    @pytest.mark.parametrize(
        "call, holds",
        [
            ('"pretrain/summary", "final_val_loss", "~", 2.0, rel=0.01', True),
            ('"pretrain/summary", "final_val_loss", "~", 2.1, rel=0.01', False),
            ('"pretrain/summary", "final_val_loss", "~", 2.0, tol=0.02', True),
            ('"pretrain/summary", "iters", "between", [1000, 2000]', True),
            ('"pretrain/summary", "iters", "between", [1, 1999]', False),
            ('"pretrain/summary", "iters", "==", datum("pretrain/summary", "iters")', True),
            ('"pretrain/benchmark", "loop", "==", "compiled"', True),
            ('"pretrain/benchmark", "ratio", ">", 1, row=0', False),
            ('"pretrain/benchmark", "ratio", ">", 1, where={"loop": "compiled"}', True),
            ('"pretrain/log", "lr", "<", None, against="grad_norm", every=True', True),
            ('"pretrain/log", "lr", ">", None, against="grad_norm", row=0', False),
        ],
    )
    def test_comparisons(self, results_env: Path, call: str, holds: bool) -> None:
        if holds:
            assert 'class="lab-claim"' in render(f"{{{{ claim({call}) }}}}")
        else:
            with pytest.raises(LabError, match="does not hold"):
                render(f"{{{{ claim({call}) }}}}")

    def test_counting_claim(self, results_env: Path) -> None:
        """'3 of 3 seeds': every selected row is compared; at_least relaxes it."""
        call = '"pretrain/seeds", "mae_bits", "<=", 0.02, where={"model": "transformer"}, every=True'
        assert render(f'{{{{ claim({call}, says="{{count}} of {{total}} seeds") }}}}').endswith(">3 of 3 seeds</span>")
        with pytest.raises(LabError, match=r"2 of 3 rows where \{'model': 'transformer'\} have mae_bits ≤ 0.011"):
            render('{{ claim("pretrain/seeds", "mae_bits", "<=", 0.011, where={"model": "transformer"}, every=True) }}')
        lax = '"pretrain/seeds", "mae_bits", "<=", 0.011, where={"model": "transformer"}, every=True, at_least=2'
        assert ">2 of 3</span>" in render(f"{{{{ claim({lax}) }}}}")

    def test_results_of_another_profile_are_not_checked(self, results_env: Path) -> None:
        html = render('{{ claim("pretrain/smoke_summary", "final_val_loss", "<", 1.88) }}')
        assert 'class="lab-claim lab-claim--unchecked"' in html and "smoke results (does not hold here" in html

    def test_bad_claims_are_refused(self, results_env: Path) -> None:
        with pytest.raises(LabError, match="comparison 'about'"):
            render('{{ claim("pretrain/summary", "iters", "about", 2000) }}')
        with pytest.raises(LabError, match="exactly one of tol= .* or rel="):
            render('{{ claim("pretrain/summary", "iters", "~", 2000) }}')
        with pytest.raises(LabError, match="cannot compare"):
            render('{{ claim("pretrain/benchmark", "loop", "<", 3) }}')
        with pytest.raises(LabError, match="has no column"):
            render('{{ claim("pretrain/summary", "nope", "<", 3) }}')

    def test_a_contradicted_claim_fails_the_build(self, mini_site: Callable[[str], Path]) -> None:
        with pytest.raises(LabError) as e:
            mini_site(
                '# Claims\n\nValidation loss {{ claim("pretrain/summary", "final_val_loss", "<", 1.88, fmt=".3f") }}.\n'
            )
        message = str(e.value)
        assert message.startswith(
            "site build failed: page index.md: claim('pretrain/summary', 'final_val_loss', '<', 1.88)"
        )
        assert "final_val_loss = 1.98765" in message and "(shown as 1.988)" in message
        assert len(message.splitlines()) == 1

    def test_a_claim_that_holds_builds(self, mini_site: Callable[[str], Path]) -> None:
        site = mini_site(
            '# Claims\n\nValidation loss {{ claim("pretrain/summary", "final_val_loss", "<", 2.5, fmt=".3f") }}.\n'
        )
        assert '">1.988</span>' in (site / "index.html").read_text()


class TestCaptions:
    """A caption's quoted legend terms exist in its chart; line styles it names are the ones drawn."""

    def test_terms_and_styles(self, results_env: Path) -> None:
        from lab.site.captions import caption_problems
        from lab.site.sources import read_spec

        spec = read_spec("pretrain/loss_dashed")  # strokeDash by split: "train" solid (first), "val" dashed
        assert caption_problems(spec, 'Loss: "train" (solid) and "val", dashed.') == []
        assert caption_problems(spec, "Loss per step, for “any quotation” at all.") == []
        (problem,) = caption_problems(spec, 'Loss: "train" (dashed) and "val".')
        assert problem == '"train" is said to be dashed, but the chart draws it solid'
        (problem,) = caption_problems(spec, 'Loss: "test" and "val".')
        assert problem.startswith('"test" is not a label of the chart')
        plain = read_spec("pretrain/loss")  # colour only: no dashes at all
        assert caption_problems(plain, 'Loss: "train" and "val" (solid).') == []
        assert caption_problems(plain, "Loss: train (solid), val (dashed).") == [
            "the caption says dashed, but the chart draws no dashes"
        ]

    def test_layered_chart_labels(self) -> None:
        from lab.site.captions import caption_problems

        spec = {
            "layer": [
                {"mark": "line", "encoding": {"color": {"datum": "train (batch)"}}},
                {
                    "mark": {"type": "rule", "strokeDash": [4, 4]},
                    "encoding": {"x": {"field": "step", "title": "lowest"}},
                },
            ],
            "datasets": {"d": [{"step": 1, "model": "paper"}]},
        }
        assert caption_problems(spec, '"train (batch)", "paper" and "lowest"; the dashed rule.') == []

    def test_a_wrong_caption_fails_the_build(self, mini_site: Callable[[str], Path]) -> None:
        with pytest.raises(
            LabError, match=r"page index.md: chart\(.*\"val\" is said to be solid, but the chart draws it dashed"
        ):
            mini_site("# Chart\n\n{{ chart('pretrain/loss_dashed', 'Loss: \"val\" (solid).') }}\n")


class TestOfflineGuard:
    """mkdocs-material's privacy plugin, fetching refused: an asset from another host fails the build."""

    @pytest.mark.parametrize(
        "html",
        [
            '<img src="https://example.org/picture.png" alt="x">',
            '<script src="https://example.org/tracker.js"></script>',
        ],
    )
    def test_external_asset_fails(self, mini_site: Callable[[str], Path], html: str) -> None:
        with pytest.raises(LabError, match=r"External file: https://example.org/"):
            mini_site(f"# Page\n\n{html}\n")

    def test_links_to_other_sites_are_fine(self, mini_site: Callable[[str], Path]) -> None:
        site = mini_site("# Page\n\nSee [nanoGPT](https://github.com/karpathy/nanoGPT).\n")
        assert 'href="https://github.com/karpathy/nanoGPT"' in (site / "index.html").read_text()


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
        with pytest.raises(
            LabError, match=r"page tracks/pretrain.md: chart.*loss\.vl\.json.*lab run pretrain --profile cpu"
        ):
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

    def test_undefined_name_fails(self, mini_site: Callable[[str], Path]) -> None:
        """A typo in a macro name is an error, not an empty string (on_undefined: strict)."""
        with pytest.raises(LabError, match="site build failed"):
            mini_site('# Page\n\n{{ valeu("pretrain/summary", "iters") }}\n')


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

    def test_the_run_log_needs_no_manifest(self, results: Path) -> None:
        """results/timings.parquet (every `lab run` rewrites it) is checked readable, not against a manifest."""
        from lab.results import TIMINGS
        from lab.site.checks import check_results
        from lab.site.hooks import published_results

        pl.DataFrame({"track": ["pretrain"], "wall_s": [1.0]}).write_parquet(results / TIMINGS)
        assert check_results(results) == []
        assert results / TIMINGS in published_results(results)
        (results / TIMINGS).write_bytes(b"not parquet")
        (problem,) = check_results(results)
        assert "timings.parquet is not readable Parquet" in problem

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
        shutil.copytree(results_env, tmp_path / "r")
        (tmp_path / "r" / "pretrain" / "summary.parquet").write_bytes(b"PAR1 garbage PAR1")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LAB_RESULTS_DIR", str(tmp_path / "r"))
            with pytest.raises(LabError, match="summary.parquet is not readable Parquet.*rerun `lab run pretrain`"):
                render('{{ value("pretrain/summary", "iters") }}')


class TestMacros:
    """The macros on their own (rendered as the plugin renders a page)."""

    def test_value_and_missing_column(self, results_env: Path) -> None:
        md = (
            'Loss {{ value("pretrain/summary", "best_val_loss", ".2f") }}, iters {{value("pretrain/summary","iters")}}.'
        )
        assert render(md) == f"Loss {SUMMARY['best_val_loss']:.2f}, iters {SUMMARY['iters']:,}."
        with pytest.raises(LabError, match="no column.*'nope'.*final_val_loss"):
            render('{{ value("pretrain/summary", "nope") }}')

    def test_value_selects_rows_and_reads_chart_data(self, results_env: Path) -> None:
        assert render('{{ value("pretrain/benchmark", "loop", where={"ratio": 1.25}) }}') == "compiled"
        assert render('{{ value("pretrain/loss", "step", where={"split": "val"}, sort="-loss", row=1) }}') == "250"
        assert (
            render('{{ value("pretrain/loss", "loss", data="chart", where={"split": "train"}, sort="step", row=1) }}')
            == "2.6"
        )
        assert render('{{ "%.2f" | format(datum("pretrain/summary", "iters") / 1000) }}') == "2.00"
        with pytest.raises(LabError, match="has 2 row"):
            render('{{ value("pretrain/benchmark", "loop", row=5) }}')

    def test_missing_parquet_names_the_command(self, results_env: Path) -> None:
        with pytest.raises(LabError, match=r"lab run C_probing --profile cpu"):
            render('{{ table("C_probing/logit_lens") }}')

    def test_chart_loads_its_spec_and_links_its_data(self, results_env: Path) -> None:
        html = render('{{ chart("pretrain/loss", "Loss per step.") }}', "tracks/pretrain.md")
        parsed = _parse(html)
        ((attrs, text),) = parsed.scripts
        assert attrs == {"src": "../results/pretrain/loss.vl.js"} and text == ""
        assert 'data-spec="results/pretrain/loss.vl.json"' in html
        hrefs = [a["href"] for tag, a in parsed.tags if tag == "a"]
        assert hrefs == [f"../results/pretrain/loss{s}" for s in (".parquet", ".csv", ".vl.json")]
        blog = render('{{ chart("pretrain/loss", "c") }}', "blog/posts/x.md", "blog/2026/11/22/x.html")
        assert 'href="../../../../results/pretrain/loss.parquet"' in blog  # relative to where the post is published

    def test_spec_script_registers_the_spec(self, results_env: Path) -> None:
        from lab.site.hooks import spec_script

        path = results_env / "pretrain" / "loss.vl.json"
        key = "results/pretrain/loss.vl.json"
        assert _registered_spec(spec_script(key, path), key) == json.loads(path.read_text())

    def test_samples_table_escapes_text(self, results_env: Path) -> None:
        import html as html_lib

        import markdown

        html = markdown.markdown(
            render('{{ table("pretrain/samples", columns=["step", "text"]) }}'),
            extensions=["tables", "attr_list", "pymdownx.arithmatex"],
            extension_configs={"pymdownx.arithmatex": {"generic": True}},
        )  # as mkdocs.yml
        cells = [html_lib.unescape(c) for c in re.findall(r"<td>(.*?)</td>", html, re.S)]
        # What the reader sees is the text itself: no markup, no emphasis, no math typeset.
        assert cells == ["x|y<br>second line <b> *not em* $no math$ layer(s) [...] \\(x\\)", "ROMEO.<br>What light?"]
        assert "arithmatex" not in html and "<em>" not in html

    def test_table_headers_rows_and_data_link(self, results_env: Path) -> None:
        out = render('{{ table("pretrain/benchmark", columns={"loop": "Loop", "ratio": "× eager"}, max_rows=1) }}')
        lines = out.strip().splitlines()
        assert lines[:3] == ["| Loop | × eager |", "| --- | ---: |", "| eager | 1 |"]
        assert lines[-2:] == [
            "The first 1 of 2 rows. Full data: [benchmark.parquet](../results/pretrain/benchmark.parquet) · "
            "[benchmark.csv](../results/pretrain/benchmark.csv)",
            "{: .lab-table__data }",
        ]
        plain = render(
            '{{ table("pretrain/benchmark", columns=["tokens_per_s"], headers={"tokens_per_s": "Tokens/s"}) }}'
        )
        assert "| Tokens/s |" in plain and "| 12,000 |" in plain
        with pytest.raises(LabError, match="does not show"):
            render('{{ table("pretrain/benchmark", columns=["loop"], formats={"ratio": ".2f"}) }}')

    def test_code_shows_macros_inside_raw(self, results_env: Path) -> None:
        md = '{% raw %}`{{ value("x/y", "z") }}`\n\n```md\n{{ chart("x/y") }}\n```\n{% endraw %}'
        assert render(md) == '`{{ value("x/y", "z") }}`\n\n```md\n{{ chart("x/y") }}\n```\n'

    def test_unknown_macro_and_bad_arguments(self, results_env: Path) -> None:
        import jinja2

        with pytest.raises(jinja2.UndefinedError, match="plot"):
            render('{{ plot("pretrain/loss") }}')
        with pytest.raises(LabError, match=r"value\('pretrain/summary'\): .*column"):
            render('{{ value("pretrain/summary") }}')


class TestFormatting:
    """Numbers to meaningful digits."""

    @pytest.mark.parametrize(
        "value, shown",
        [
            (0.0, "0"),
            (2000.0, "2,000"),
            (1_536_000, "1,536,000"),
            (12_447.3, "12,447"),
            (123.456, "123"),
            (1.98765, "1.99"),
            (0.010664, "0.0107"),
            (0.0078125, "0.00781"),
            (0.00078, "7.8 × 10⁻⁴"),
            (2.4e-7, "2.4 × 10⁻⁷"),
            (True, "yes"),
            (None, "—"),
        ],
    )
    def test_default(self, value: float, shown: str) -> None:
        from lab.site.formatting import format_cell

        assert format_cell(value) == shown

    def test_formats(self) -> None:
        from lab.site.formatting import format_cell

        assert format_cell(0.4667, ".0%") == "47%"
        assert format_cell(2578.5, "min") == "43 min"
        with pytest.raises(LabError, match="format '.3f' does not fit 'x'"):
            format_cell("x", ".3f")


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
        blog = (site / "docs" / "blog.html").read_text()
        assert 'href="../tracks/pretrain.html#results"' in blog
        bayes = (site / "docs" / "papers" / "bayes.html").read_text()
        assert 'href="../../results/pretrain/loss.parquet"' in bayes
        assert 'href="../../questions.html#q14"' in bayes
        home = (site / "index.html").read_text()
        assert "Notes" in home and "Bayes notes" in home  # appended to the navigation, titled by heading

    def test_empty_docs_folder_is_fine(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import lab.site.hooks as hooks

        monkeypatch.setattr(hooks, "DOCS_DIR", tmp_path / "absent")
        assert hooks._docs_files() == []


def test_csv_text_keeps_nested_values(tmp_path: Path) -> None:
    """The CSV beside a Parquet file carries list columns as JSON text (CSV has no nested values)."""
    from lab.site.hooks import csv_text

    path = tmp_path / "x.parquet"
    pl.DataFrame({"a": [1, 2], "b": [[1.5, 2.0], []]}).write_parquet(path)
    assert csv_text(path).splitlines() == ["a,b", '1,"[1.5, 2.0]"', "2,[]"]
