// MathJax 3 configuration. Pages: pymdownx.arithmatex (generic mode) emits maths with
// \( \) and \[ \] delimiters. Notebooks (rendered by mkdocs-jupyter) keep $...$ and
// $$...$$ in their Markdown cells. Code (<pre>, <code>) is never typeset. Re-typeset after
// instant navigation.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
};

document$.subscribe(() => {
  if (!window.MathJax || !MathJax.typesetPromise) {
    return; // not loaded yet: MathJax typesets the page itself when it starts
  }
  MathJax.startup.output.clearCache();
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});
