// MathJax 3 configuration. Pages: pymdownx.arithmatex (generic mode) wraps maths in
// elements of class "arithmatex" with \( \) and \[ \] delimiters. Notebooks (rendered by
// mkdocs-jupyter) keep $...$ and $$...$$ in their Markdown cells ("jp-MarkdownOutput").
// Only those elements are typeset; re-typeset after instant navigation.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex|jp-MarkdownOutput",
  },
};

document$.subscribe(() => {
  MathJax.startup.output.clearCache();
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});
