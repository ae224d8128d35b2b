"""What every track's charts share: the registry protocol of ``CHARTS`` (a chart that needs other results of its
set) and, below, the house style that keeps every figure readable at a 1280-px window and on a 390-px phone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import altair as alt
import polars as pl

from lab.errors import LabError

ChartFn = Callable[..., Any]  # frame -> alt chart; with ``needs``: frame, **{result name: frame} -> alt chart


def needs(*names: str) -> Callable[[ChartFn], ChartFn]:
    """Mark a chart function of a ``CHARTS`` registry as drawing other results of the same set too: it is called
    ``fn(frame, **{name: that result's frame})`` (by :func:`chart_for` when the track writes, and by
    :func:`lab.results.rechart`)."""

    def mark(fn: ChartFn) -> ChartFn:
        fn.needs = names  # type: ignore[attr-defined]
        return fn

    return mark


def chart_for(
    charts: dict[str, ChartFn], name: str, read: Callable[[str], pl.DataFrame]
) -> Callable[[pl.DataFrame], Any] | None:
    """``charts[name]`` as :func:`lab.results.write_result` takes it (``frame -> chart``), the other results it
    :func:`needs` read by ``read(result name)``; None when the result has no chart."""
    fn = charts.get(name)
    wanted = getattr(fn, "needs", ())
    if fn is None or not wanted:
        return fn
    return lambda frame: fn(frame, **{n: read(n) for n in wanted})


# ----------------------------------------------------------------------------- the house style

# Material's text column at a 390-px phone window is 358 px wide (1280 px: 688 px). Every chart is drawn to the
# width of its column (``width="container"``, ``autosize: fit-x`` with the axes and legends counted inside), so it
# is never scaled down by the page: panels are stacked (vconcat shares one container width), never side by side
# (hconcat) nor faceted (neither can take the container's width).
PHONE_COLUMN_PX = 358
LABEL_PX = 11  # axis and legend labels, text marks
TITLE_PX = 12  # axis, legend and panel titles
HEADER_PX = 13  # the chart's own title
PANEL_HEIGHT = 180  # px: a panel of a stack (a stack of n panels is about n x (this + 50) px tall)


def style(chart: alt.TopLevelMixin) -> alt.TopLevelMixin:
    """The lab's chart, ready to write: full column width (views without a width get ``"container"``; a stack's
    panels too), axes and legends inside it (``fit-x`` autosize), text at least 10 px, legends under the plot.

    Raises:
        LabError: ``chart`` is side by side (hconcat), faceted or repeated: at 390 px it would be shrunk. Stack its
            panels (:func:`stack`) or let the reader pick one (:func:`pick`).
    """
    if isinstance(chart, (alt.HConcatChart, alt.FacetChart, alt.RepeatChart, alt.ConcatChart)):
        raise LabError(
            f"a {type(chart).__name__} cannot take the column's width: stack the panels with lab.plots.stack or "
            "let the reader pick one with lab.plots.pick"
        )
    if isinstance(chart, alt.VConcatChart):
        chart = chart.copy()
        chart.vconcat = [_full_width(panel) for panel in chart.vconcat]
    else:
        chart = _full_width(chart)
    return (
        chart.properties(autosize=alt.AutoSizeParams(type="fit-x", contains="padding"))
        .configure_axis(labelFontSize=LABEL_PX, titleFontSize=TITLE_PX, labelLimit=160, titleLimit=320)
        .configure_legend(
            labelFontSize=LABEL_PX, titleFontSize=TITLE_PX, orient="bottom", labelLimit=300, columns=2, symbolLimit=40
        )
        .configure_header(labelFontSize=TITLE_PX, titleFontSize=TITLE_PX)
        .configure_title(fontSize=HEADER_PX, subtitleFontSize=LABEL_PX, anchor="start", offset=6)
        .configure_text(fontSize=LABEL_PX)
        .configure_concat(spacing=24)
    )


def _full_width(view: Any) -> Any:
    if isinstance(view, (alt.Chart, alt.LayerChart)) and view.width is alt.Undefined:
        return view.properties(width="container")
    return view


def stack(*panels: Any, title: str | None = None) -> alt.VConcatChart:
    """Panels one above the other, each as wide as the column (what a facet or side-by-side layout becomes)."""
    out = alt.vconcat(*panels)
    return out.properties(title=title) if title else out


def pick(
    name: str,
    options: list[Any],
    *,
    label: str,
    labels: list[str] | None = None,
    value: Any = None,
    radio: bool = False,
) -> alt.Parameter:
    """A reader's choice, bound to a select box (or radio buttons) under the chart: a Vega-Lite variable
    parameter, so it works offline with no server. Filter with ``transform_filter(f"datum.x == {name}")``.

    Args:
        name: The parameter's name (a JavaScript identifier; named here so the spec is the same on every run).
        options: The values to choose from (plain Python values: cast numpy scalars first).
        label: What the input is called on the page.
        labels: How each option is shown (default: the option itself).
        value: The initial choice (default: the first option).
    """
    options = [o.item() if hasattr(o, "item") else o for o in options]
    if not options:
        raise LabError(f"the reader's choice {name!r} has no options: the chart's frame is empty")
    kind = alt.binding_radio if radio else alt.binding_select
    bind = kind(options=options, labels=labels or [str(o) for o in options], name=f"{label} ")
    return alt.param(name=name, value=options[0] if value is None else value, bind=bind)


def distinct(frame: pl.DataFrame, column: str, *, by: str | None = None) -> list[Any]:
    """The distinct values of ``column`` in order of first appearance (or of ``by``): a choice's options."""
    if by is not None:
        frame = frame.sort(by)
    return frame[column].unique(maintain_order=True).to_list()
