// The attribution-graph viewer: every `.lab-graph` element lists circuit-tracer graphs (results/E_circuits/graphs/)
// in `data-graphs`, a JSON list of {"label": shown in the picker, "key": the graph's slug, "src": a script, relative
// to the page, that registers the graph as `window.LabGraphs[key] = {...circuit-tracer JSON...}`}. Scripts, not
// fetched JSON, so the viewer also works opened from disk (file://). Drawn with the bundled Vega-Lite: token
// position across, layer up (embeddings at 0, the logits on top); nodes sized by influence, the strongest links
// (the reader sets how many) red when positive, blue when negative. Hover a node for its id, layer, position,
// feature and label (circuit-tracer's `clerp`: the tokens the feature fires on most in held-out text, `lab.interp.quality`).
(function () {
  "use strict";
  window.LabGraphs = window.LabGraphs || {};
  var MAX_LINKS = 800; // rows embedded per graph: the strongest links by |weight|
  var KINDS = ["embedding", "cross layer transcoder", "mlp reconstruction error", "logit"];

  function load(graph, base) {
    if (window.LabGraphs[graph.key]) return Promise.resolve(window.LabGraphs[graph.key]);
    return new Promise(function (resolve, reject) {
      var s = document.createElement("script");
      s.src = new URL(graph.src, base).href;
      s.onload = function () {
        if (window.LabGraphs[graph.key]) resolve(window.LabGraphs[graph.key]);
        else reject(new Error(graph.src + " did not register graph " + graph.key));
      };
      s.onerror = function () { reject(new Error("could not load " + graph.src)); };
      document.head.appendChild(s);
    });
  }

  function level(node) {
    if (node.feature_type === "embedding") return 0;
    if (node.feature_type === "logit") return Number(node.layer) + 1;
    return Number(node.layer) + 1;
  }

  function rows(graph) {
    var tokens = (graph.metadata && graph.metadata.prompt_tokens) || [];
    var byId = {};
    var nodes = graph.nodes.map(function (n) {
      var row = {
        id: n.node_id,
        kind: n.feature_type,
        layer: level(n),
        pos: n.ctx_idx,
        token: tokens[n.ctx_idx] !== undefined ? JSON.stringify(tokens[n.ctx_idx]) : "",
        feature: n.feature,
        label: n.clerp || "",
        influence: n.influence === null || n.influence === undefined ? 0 : n.influence,
        activation: n.activation === null || n.activation === undefined ? NaN : n.activation,
      };
      byId[n.node_id] = row;
      return row;
    });
    var links = graph.links
      .filter(function (l) { return byId[l.source] && byId[l.target]; })
      .sort(function (a, b) { return Math.abs(b.weight) - Math.abs(a.weight); })
      .slice(0, MAX_LINKS)
      .map(function (l, i) {
        var s = byId[l.source], t = byId[l.target];
        return { rank: i + 1, weight: l.weight, pos: s.pos, layer: s.layer, pos2: t.pos, layer2: t.layer,
                 source: l.source, target: l.target };
      });
    return { nodes: nodes, links: links, tokens: tokens };
  }

  function spec(data) {
    var n = data.tokens.length;
    var positions = [];
    for (var i = 0; i < n; i++) positions.push(i);
    var tokenLabels = data.tokens.map(function (t, i) { return i + ":" + t.replace(/\n/g, "\\n"); });
    var x = { field: "pos", type: "quantitative", title: "token position",
              scale: { domain: [-0.5, Math.max(n - 0.5, 0.5)], nice: false, zero: false },
              axis: { values: positions, labelExpr: "labels[datum.value]", labelAngle: -90, labelOverlap: "greedy",
                      labelLimit: 90, grid: false } };
    var y = { field: "layer", type: "quantitative", title: "layer (0 = embeddings, top = logits)" };
    return {
      width: "container",
      height: 420,
      autosize: { type: "fit-x", contains: "padding" },
      params: [
        { name: "labels", value: tokenLabels },
        { name: "top_links", value: Math.min(150, data.links.length),
          bind: { input: "range", min: 0, max: data.links.length, step: 10, name: "strongest links shown " } },
      ],
      config: { axis: { labelFontSize: 11, titleFontSize: 12 }, legend: { labelFontSize: 11, titleFontSize: 12,
                orient: "bottom", columns: 2, labelLimit: 300 } },
      layer: [
        { data: { values: data.links },
          transform: [{ filter: "datum.rank <= top_links" }],
          mark: { type: "rule", opacity: 0.4 },
          encoding: {
            x: x, y: y, x2: { field: "pos2" }, y2: { field: "layer2" },
            color: { condition: { test: "datum.weight > 0", value: "#d62728" }, value: "#1f77b4" },
            strokeWidth: { field: "weight", type: "quantitative", legend: null,
                           scale: { type: "sqrt", range: [0.3, 3] } },
            tooltip: [{ field: "source" }, { field: "target" }, { field: "weight", format: ".3f" }],
          } },
        { data: { values: data.nodes },
          mark: { type: "circle", opacity: 0.85 },
          encoding: {
            x: x, y: y,
            size: { field: "influence", type: "quantitative", legend: null, scale: { range: [15, 250] } },
            color: { field: "kind", type: "nominal", title: "node", scale: { domain: KINDS } },
            tooltip: [
              { field: "id", title: "node" }, { field: "kind" }, { field: "layer" }, { field: "pos", title: "position" },
              { field: "token" }, { field: "feature" }, { field: "label", title: "feature label" },
              { field: "influence", format: ".3f" }, { field: "activation", format: ".3f" },
            ],
          } },
      ],
    };
  }

  function dark() {
    return document.body.getAttribute("data-md-color-scheme") === "slate";
  }

  function draw(el, graphs) {
    var plot = el.querySelector(".lab-graph__plot");
    var select = el.querySelector("select");
    var graph = graphs[Number(select.value)];
    if (el.labView) { el.labView.finalize(); el.labView = null; }
    load(graph, document.baseURI)
      .then(function (g) {
        var options = { actions: false, renderer: "svg", config: { background: "transparent" } };
        if (dark()) options.theme = "dark";
        return vegaEmbed(plot, spec(rows(g)), options);
      })
      .then(function (result) { el.labView = result; el.classList.remove("lab-graph--error"); })
      .catch(function (err) {
        el.classList.add("lab-graph--error");
        plot.textContent = "The graph could not be drawn: " + err.message;
      });
  }

  function setUp(el) {
    if (el.labGraphReady) return;
    el.labGraphReady = true;
    var graphs;
    try {
      graphs = JSON.parse(el.getAttribute("data-graphs") || "[]");
    } catch (e) {
      el.textContent = "The graph list is not valid JSON: " + e.message;
      return;
    }
    var label = document.createElement("label");
    label.className = "lab-graph__picker";
    label.textContent = "graph ";
    var select = document.createElement("select");
    graphs.forEach(function (g, i) {
      var o = document.createElement("option");
      o.value = String(i);
      o.textContent = g.label || g.key;
      select.appendChild(o);
    });
    label.appendChild(select);
    var plot = document.createElement("div");
    plot.className = "lab-graph__plot";
    el.appendChild(label);
    el.appendChild(plot);
    select.addEventListener("change", function () { draw(el, graphs); });
    el.labGraphs = graphs;
    draw(el, graphs);
  }

  function all() {
    document.querySelectorAll(".lab-graph").forEach(setUp);
  }

  if (location.protocol !== "file:" && typeof document$ !== "undefined") {
    document$.subscribe(function () { all(); });
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", all);
  } else {
    all();
  }
  new MutationObserver(function () {
    document.querySelectorAll(".lab-graph").forEach(function (el) { if (el.labGraphs) draw(el, el.labGraphs); });
  }).observe(document.body, { attributes: true, attributeFilter: ["data-md-color-scheme"] });
})();
