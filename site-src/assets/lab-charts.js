// Render the lab's Vega-Lite figures: every `.lab-chart__plot[data-spec]` (written by the chart() macro in
// lab/site/hooks.py) gets the spec fetched from results/ and embedded with the bundled vega-embed.
// Runs on every page view (Material's instant navigation included) and re-renders when the palette toggles,
// using vega-embed's "dark" theme on the slate scheme.
(function () {
  "use strict";
  var specs = new Map(); // absolute URL -> Promise<spec>
  var views = [];

  function darkMode() {
    return document.body.getAttribute("data-md-color-scheme") === "slate";
  }

  function fetchSpec(url) {
    if (!specs.has(url)) {
      specs.set(url, fetch(url).then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status + " for " + url);
        return r.json();
      }));
    }
    return specs.get(url);
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

  function renderAll() {
    views.splice(0).forEach(function (v) { v.finalize(); });
    var dark = darkMode();
    document.querySelectorAll(".lab-chart__plot[data-spec]").forEach(function (el) {
      var url = new URL(el.getAttribute("data-spec"), window.location.href).href;
      fetchSpec(url)
        .then(function (spec) {
          var options = { actions: false, renderer: "svg", config: { background: "transparent" } };
          if (dark) options.theme = "dark";
          return vegaEmbed(el, fitWidth(spec), options);
        })
        .then(function (result) {
          el.classList.remove("lab-chart__plot--error");
          views.push(result);
        })
        .catch(function (err) {
          el.classList.add("lab-chart__plot--error");
          el.textContent = "Chart could not be rendered: " + err.message;
        });
    });
  }

  document$.subscribe(renderAll);
  new MutationObserver(function () { renderAll(); })
    .observe(document.body, { attributes: true, attributeFilter: ["data-md-color-scheme"] });
})();
