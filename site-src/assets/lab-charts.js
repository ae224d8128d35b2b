// Render the lab's Vega-Lite figures: every `.lab-chart__plot[data-spec]` (written by the chart() macro in
// lab/site/macros.py) is drawn with the bundled vega-embed from `window.LabSpecs[data-spec]`, which the script next
// to it (`results/<track>/<name>.vl.js`) registers: a script loads from file:// as well as from a server, a fetch of
// the `.vl.json` would not.
// Runs on every page view (Material's instant navigation included) and re-renders when the palette toggles,
// using vega-embed's "dark" theme on the slate scheme.
(function () {
  "use strict";
  var views = [];

  // Material's `document$` emits on every page view, but never from file:// with instant navigation on (Material
  // turns instant navigation off there and the stream completes unused): then run once the page has loaded.
  function onEveryPage(fn) {
    if (location.protocol !== "file:" && typeof document$ !== "undefined") {
      document$.subscribe(function () { fn(); });
    } else if (document.readyState === "loading") {
      document.addEventListener("DOMContentLoaded", fn);
    } else {
      fn();
    }
  }

  function darkMode() {
    return document.body.getAttribute("data-md-color-scheme") === "slate";
  }

  function specOf(plot) {
    var key = plot.getAttribute("data-spec");
    var spec = window.LabSpecs && window.LabSpecs[key];
    if (!spec) throw new Error("its spec (" + key.replace(/\.json$/, ".js") + ") did not load");
    return spec;
  }

  function fitWidth(spec) {
    var copy = JSON.parse(JSON.stringify(spec));
    var composite = ["hconcat", "vconcat", "concat", "facet", "repeat"].some(function (k) { return k in copy; });
    if (!composite && copy.width === undefined) {
      copy.width = "container";
      copy.autosize = copy.autosize || { type: "fit-x", contains: "padding" };
    }
    return copy;
  }

  function fail(el, message) {
    el.classList.add("lab-chart__plot--error");
    el.textContent = "Chart could not be rendered: " + message;
  }

  function renderOne(el) {
    var options = { actions: false, renderer: "svg", config: { background: "transparent" } };
    if (darkMode()) options.theme = "dark";
    if (el.labView) el.labView.finalize();
    Promise.resolve()
      .then(function () { return vegaEmbed(el, fitWidth(specOf(el)), options); })
      .then(function (result) {
        el.classList.remove("lab-chart__plot--error");
        el.labView = result;
        views.push(result);
      })
      .catch(function (err) { fail(el, err.message); });
  }

  // Draw every chart whose spec has loaded; the others are drawn when their script calls labChartLoaded (after
  // Material's instant navigation the scripts of the new page can load after it is shown).
  function renderAll() {
    views.splice(0).forEach(function (v) { v.finalize(); });
    document.querySelectorAll(".lab-chart__plot[data-spec]").forEach(function (el) {
      el.labView = null;
      var key = el.getAttribute("data-spec");
      if (window.LabSpecs && window.LabSpecs[key]) {
        renderOne(el);
      } else {
        setTimeout(function () {
          if (!(window.LabSpecs && window.LabSpecs[key])) {
            fail(el, "its spec (" + key.replace(/\.json$/, ".js") + ") did not load");
          }
        }, 10000);
      }
    });
  }

  window.labChartLoaded = function (key) {
    document.querySelectorAll(".lab-chart__plot[data-spec]").forEach(function (el) {
      if (el.getAttribute("data-spec") === key) renderOne(el);
    });
  };

  // Opened from disk, the site works except for search (its index is loaded by a web worker, which browsers do
  // not start from file://): say so where the reader would type.
  function explainSearchFromDisk() {
    if (location.protocol !== "file:") return;
    document.querySelectorAll("input.md-search__input").forEach(function (input) {
      input.disabled = true;
      input.placeholder = "Search needs the served site: lab site serve";
      input.title = "Search does not work from file://. Run `.venv/bin/lab site serve` and open http://127.0.0.1:8000";
    });
  }

  onEveryPage(function () {
    renderAll();
    explainSearchFromDisk();
  });
  new MutationObserver(function () { renderAll(); })
    .observe(document.body, { attributes: true, attributeFilter: ["data-md-color-scheme"] });
})();
