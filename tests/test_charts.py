"""The tracks' chart registries (``CHARTS`` in each ``run.py``), :func:`lab.results.rechart`, and the house style
(:mod:`lab.plots`), checked on the committed results.

- rechart rebuilds a ``<name>.vl.json`` from the committed Parquet exactly as the track's run writes it, refreshes
  the manifest, changes nothing else, and leaves the set whole when a chart fails;
- every committed chart is what the current chart code draws (a chart changed without redrawing fails here);
- every chart is drawn to the column's width (no side-by-side panels, no facets), with text of at least 10 px,
  at most Altair's 5000 rows per dataset, no rows that no view draws, and every track has a chart the reader
  can explore (a bound parameter).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import altair as alt
import polars as pl
import pytest

from lab.errors import LabError
from lab.paths import REPO_ROOT
from lab.results import read_manifest, rechart, result_set, write_result
from lab.site.checks import check_results
from lab.tracks import TRACKS

COMMITTED = REPO_ROOT / "results"
MAX_ROWS = 5000  # Altair's MaxRowsError limit


def registry(track: str) -> dict[str, Any]:
    return importlib.import_module(f"lab.tracks.{track}.run").CHARTS


def draw(track: str, name: str, root: Path = COMMITTED) -> dict[str, Any]:
    """The spec the registry draws for one committed result (the other results it needs read beside it)."""
    fn = registry(track)[name]
    folder = root / track
    others = {n: pl.read_parquet(folder / f"{n}.parquet") for n in getattr(fn, "needs", ())}
    return fn(pl.read_parquet(folder / f"{name}.parquet"), **others).to_dict()


def committed_charts() -> list[tuple[str, str]]:
    return [(t, p.name.removesuffix(".vl.json")) for t in TRACKS for p in sorted((COMMITTED / t).glob("*.vl.json"))]


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(autouse=True)
def _nothing_reaches_the_committed_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that forgets its ``root`` lands in a temp folder, never in results/."""
    monkeypatch.setenv("LAB_RESULTS_DIR", str(tmp_path / "default-root"))


@pytest.fixture
def copy_of(tmp_path: Path):
    """``copy_of(track)``: the committed results of one track copied under a temp root; returns the root."""

    def make(*tracks: str) -> Path:
        root = tmp_path / "results"
        for t in tracks:
            shutil.copytree(COMMITTED / t, root / t)
        return root

    return make


# ----------------------------------------------------------------------------- the registries


@pytest.mark.parametrize("track", list(TRACKS))
def test_every_committed_chart_has_a_registry_entry(track: str) -> None:
    """What rechart can redraw is what the track publishes: every committed chart, no more."""
    published = {n for t, n in committed_charts() if t == track}
    manifest = read_manifest(COMMITTED / track / "manifest.json")
    assert published <= set(registry(track)), f"charts with no CHARTS entry: {published - set(registry(track))}"
    assert set(registry(track)) <= set(manifest), f"CHARTS names no result: {set(registry(track)) - set(manifest)}"


def test_write_result_and_rechart_write_the_same_bytes(copy_of, tmp_path: Path) -> None:
    """A result written by the track's path (write_result with the registry's chart) is redrawn byte for byte."""
    charts = registry("pretrain")
    root = tmp_path / "fresh"
    frame = pl.read_parquet(COMMITTED / "pretrain" / "ablation.parquet")
    with result_set("pretrain", "cpu", root=root):
        write_result(
            "pretrain",
            "ablation",
            frame,
            config={},
            seed=0,
            profile="cpu",
            wall_time_s=1.0,
            chart=charts["ablation"],
            root=root,
        )
    written = (root / "pretrain" / "ablation.vl.json").read_bytes()
    assert rechart("pretrain", "cpu", {"ablation": charts["ablation"]}, root=root) == ["ablation"]
    assert (root / "pretrain" / "ablation.vl.json").read_bytes() == written
    assert check_results(root) == []


@pytest.mark.parametrize("track", list(TRACKS))
def test_rechart_is_deterministic_and_keeps_the_set_valid(copy_of, track: str) -> None:
    """Redrawing twice gives the same bytes (no counters, no unordered aggregates), the parquet files are
    untouched, and the manifest matches every file."""
    root = copy_of(track)
    before = _files(root / track)
    names = rechart(track, "cpu", registry(track), root=root)
    once = _files(root / track)
    assert rechart(track, "cpu", registry(track), root=root) == names
    assert _files(root / track) == once
    assert {f for f in once if f.endswith(".parquet")} == {f for f in before if f.endswith(".parquet")}
    assert all(once[f] == before[f] for f in before if not f.endswith((".vl.json", "manifest.json")))
    assert check_results(root) == []


@pytest.mark.parametrize("track", list(TRACKS))
def test_committed_charts_are_what_the_chart_code_draws(copy_of, track: str) -> None:
    """The committed ``.vl.json`` files are the current chart code's drawing of the committed Parquet: a chart
    function changed without redrawing its results fails here."""
    root = copy_of(track)
    rechart(track, "cpu", registry(track), root=root)
    stale = [
        p.name
        for p in sorted((COMMITTED / track).glob("*.vl.json"))
        if p.read_bytes() != (root / track / p.name).read_bytes()
    ]
    assert stale == [], (
        f"{track}: {stale} differ from what CHARTS draws: re-run the track, or redraw them with "
        f"lab.results.rechart({track!r}, 'cpu', lab.tracks.{track}.run.CHARTS)"
    )


def test_a_changed_chart_changes_only_its_file(copy_of) -> None:
    root = copy_of("pretrain")
    before = _files(root / "pretrain")

    def bars(frame: pl.DataFrame) -> alt.Chart:
        return alt.Chart(frame).mark_bar().encode(x="step:Q", y="loss:Q")

    assert rechart("pretrain", "cpu", {"ablation": bars}, root=root) == ["ablation"]
    after = _files(root / "pretrain")
    changed = {f for f in after if after[f] != before.get(f)}
    assert changed == {"ablation.vl.json", "manifest.json"}
    assert json.loads(after["ablation.vl.json"])["mark"]["type"] == "bar"
    record = read_manifest(root / "pretrain" / "manifest.json")["ablation"]
    assert record["sha256"]["ablation.vl.json"] == hashlib.sha256(after["ablation.vl.json"]).hexdigest()
    assert record["bytes"]["ablation.vl.json"] == len(after["ablation.vl.json"])
    old = json.loads(before["manifest.json"])
    new = json.loads(after["manifest.json"])
    assert {k: v for k, v in new.items() if k != "ablation"} == {k: v for k, v in old.items() if k != "ablation"}
    assert check_results(root) == []


def test_a_failing_chart_leaves_the_set_unchanged(copy_of) -> None:
    root = copy_of("pretrain")
    before = _files(root / "pretrain")

    def broken(frame: pl.DataFrame) -> alt.Chart:
        raise ValueError("boom")

    def nan(frame: pl.DataFrame) -> alt.Chart:
        return alt.Chart(pl.DataFrame({"x": [float("nan")]})).mark_point().encode(x="x:Q")

    charts = registry("pretrain")
    with pytest.raises(ValueError, match="boom"):
        rechart("pretrain", "cpu", {"loss": charts["loss"], "log": broken}, root=root)
    with pytest.raises(LabError, match="NaN"):
        rechart("pretrain", "cpu", {"loss": charts["loss"], "log": nan}, root=root)
    assert _files(root / "pretrain") == before


def test_rechart_needs_a_manifest(tmp_path: Path) -> None:
    (tmp_path / "pretrain").mkdir()
    with pytest.raises(LabError, match="manifest.json is missing"):
        rechart("pretrain", "cpu", registry("pretrain"), root=tmp_path)


def test_a_chart_that_needs_another_result_reads_it_from_the_set(copy_of) -> None:
    """D's curves draw the summary's target as a rule: a different target in the summary moves the rule."""
    root = copy_of("D_bayes")
    summary = pl.read_parquet(root / "D_bayes" / "summary.parquet").with_columns(target_mae=pl.lit(0.5))
    summary.write_parquet(root / "D_bayes" / "summary.parquet")
    rechart("D_bayes", "cpu", {"curves": registry("D_bayes")["curves"]}, root=root)
    spec = json.loads((root / "D_bayes" / "curves.vl.json").read_text())
    rows = [r for rows in spec["datasets"].values() for r in rows]
    assert {"mae_bits": 0.5, "label": "target 0.5 bits"} in rows


# ----------------------------------------------------------------------------- the house style


def _views(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The top-level views: a stack's panels, or the chart itself."""
    return spec.get("vconcat", [spec])


def _filters(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [t["filter"] for t in node.get("transform", []) if isinstance(t.get("filter"), str)]
        return found + [f for k, v in node.items() if k not in ("datasets", "data") for f in _filters(v)]
    if isinstance(node, list):
        return [f for item in node for f in _filters(item)]
    return []


_EQUALS = re.compile(r"^\(datum\.(\w+) (===|!==) (?:'([^']*)'|([-\d.]+))\)$")


def undrawn_rows(spec: dict[str, Any]) -> list[str]:
    """Values of a field that every view filters out by a fixed test (``datum.x === 'v'``): rows carried in the
    JSON that nothing draws. Filters on a reader's parameter keep their rows (the reader can draw them)."""
    rows = [r for dataset in spec.get("datasets", {}).values() for r in dataset]
    kept: dict[str, set[Any]] = {}
    for expr in _filters(spec):
        m = _EQUALS.match(expr)
        if not m:
            continue
        field, op, text, number = m.groups()
        value = text if text is not None else float(number)
        kept.setdefault(field, set()).add(value if op == "===" else ("not", value))
    out = []
    for field, values in kept.items():
        excluded = {v[1] for v in values if isinstance(v, tuple)}
        if excluded & values:  # x === v in one view, x !== v in another: every row is drawn
            continue
        shown = {v for v in values if not isinstance(v, tuple)}
        for r in rows:
            v = r.get(field)
            v = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
            if field in r and (v in excluded or (shown and v not in shown)):
                out.append(f"{field}={r[field]!r}")
    return sorted(set(out))


@pytest.mark.parametrize(("track", "name"), committed_charts())
def test_chart_fits_the_column(track: str, name: str) -> None:
    spec = draw(track, name)
    assert not {"hconcat", "facet", "repeat", "concat"} & set(spec), "side-by-side or faceted: shrunk on a phone"
    assert spec["autosize"] == {"type": "fit-x", "contains": "padding"}
    for view in _views(spec):
        assert view.get("width", "container") in ("container",) or view["width"] <= 358, view.get("width")
    config = spec["config"]
    sizes = [config["axis"]["labelFontSize"], config["axis"]["titleFontSize"], config["legend"]["labelFontSize"]]
    sizes += [config["text"]["fontSize"]]
    sizes += [n["fontSize"] for n in _walk(spec) if isinstance(n.get("fontSize"), (int, float))]
    assert min(sizes) >= 10, sizes
    for rows in spec.get("datasets", {}).values():
        assert len(rows) <= MAX_ROWS
    assert undrawn_rows(spec) == [], "rows no view draws: filter them out before encoding"


def _walk(node: Any):
    if isinstance(node, dict):
        yield node
        for k, v in node.items():
            if k != "datasets":
                yield from _walk(v)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


@pytest.mark.parametrize("track", list(TRACKS))
def test_every_track_has_a_chart_to_explore(track: str) -> None:
    bound = [
        name
        for t, name in committed_charts()
        if t == track and any("bind" in p for p in draw(t, name).get("params", []))
    ]
    assert bound, f"{track} has no chart with a parameter bound to an input"


def test_undrawn_rows_are_found() -> None:
    """The check above, on charts whose truth is known."""
    from lab.plots import style

    frame = pl.DataFrame({"kind": ["train", "eval"], "loss": [1.0, 2.0]})
    one = alt.Chart(frame).transform_filter(alt.datum.kind == "eval").mark_point().encode(y="loss:Q")
    assert undrawn_rows(style(one).to_dict()) == ["kind='train'"]
    both = alt.vconcat(
        one, alt.Chart(frame).transform_filter(alt.datum.kind == "train").mark_point().encode(y="loss:Q")
    )
    assert undrawn_rows(style(both).to_dict()) == []
    assert (
        undrawn_rows(style(alt.Chart(frame.filter(pl.col("kind") == "eval")).mark_point().encode(y="loss:Q")).to_dict())
        == []
    )


def test_style_refuses_what_cannot_fit() -> None:
    from lab.plots import style

    c = alt.Chart(pl.DataFrame({"x": [1]})).mark_point().encode(x="x:Q")
    for chart in (alt.hconcat(c, c), c.facet(column="x:N")):
        with pytest.raises(LabError, match="cannot take the column's width"):
            style(chart)
