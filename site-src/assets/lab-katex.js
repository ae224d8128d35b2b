// Typeset the math that pymdownx.arithmatex (generic mode) leaves as \( \) / \[ \] in .arithmatex elements.
// Runs on every page view, including Material's instant navigation, and once on load when the site is opened from
// disk (file://), where Material's `document$` never emits.
(function () {
  "use strict";

  function typeset() {
    document.querySelectorAll(".arithmatex").forEach(function (el) {
      renderMathInElement(el, {
        delimiters: [
          { left: "\\(", right: "\\)", display: false },
          { left: "\\[", right: "\\]", display: true },
        ],
        throwOnError: false,
      });
    });
  }

  if (location.protocol !== "file:" && typeof document$ !== "undefined") {
    document$.subscribe(function () { typeset(); });
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", typeset);
  } else {
    typeset();
  }
})();
