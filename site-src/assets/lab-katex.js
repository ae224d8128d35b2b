// Typeset the math that pymdownx.arithmatex (generic mode) leaves as \( \) / \[ \] in .arithmatex elements.
// Runs on every page view, including Material's instant navigation.
document$.subscribe(function () {
  document.querySelectorAll(".arithmatex").forEach(function (el) {
    renderMathInElement(el, {
      delimiters: [
        { left: "\\(", right: "\\)", display: false },
        { left: "\\[", right: "\\]", display: true },
      ],
      throwOnError: false,
    });
  });
});
