"""MkDocs hooks: pages built from files that live outside `docs/`.

- **Notebooks.** `notebooks/*.ipynb` (at the repository root) become pages
  `notebooks/<name>.ipynb` (URL `notebooks/<name>/`), rendered by mkdocs-jupyter with
  their saved outputs (nothing is executed at build time). Notebooks named in `mkdocs.yml`'s navigation but absent
  from `notebooks/` are dropped from the navigation, so the build never fails for a
  notebook that has not been written yet; notebooks present but not named there are
  appended to the "Examples" section.
- **Benchmarks.** The line `<!-- benchmark-results -->` in `benchmarks.md` is replaced by
  every `benchmarks/results/*.md` (headings moved down one level), and the plots
  `benchmarks/results/*.png` are copied into the site and shown on that page.
"""

import json
import logging
import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File


log = logging.getLogger("mkdocs.hooks.diffrax_deer")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLES_DIR = "notebooks"
EXAMPLES_SECTION = "Examples"
RESULTS_MARKER = "<!-- benchmark-results -->"
BENCHMARK_PAGE = "benchmarks.md"

# Order of the benchmark result files on the page (by file-name prefix); others follow
# alphabetically.
RESULTS_ORDER = ("solver", "scan", "robust", "reference", "maxgrid", "sharding")


def _notebooks() -> list[Path]:
    if not NOTEBOOKS.is_dir():
        return []
    return sorted(p for p in NOTEBOOKS.glob("*.ipynb") if not p.name.startswith("."))


def _notebook_title(path: Path) -> str:
    """The first Markdown heading of the notebook, else its file name."""
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
        for cell in nb.get("cells", []):
            if cell.get("cell_type") != "markdown":
                continue
            source = cell.get("source", "")
            text = "".join(source) if isinstance(source, list) else source
            for line in text.splitlines():
                match = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
                if match:
                    # Plain text for the navigation: drop code and emphasis markers.
                    return re.sub(r"[`*]", "", match.group(1)).strip()
    except (OSError, ValueError) as e:
        log.warning("Cannot read notebook %s: %s", path, e)
    return path.stem.replace("_", " ").capitalize()


def _nav_item_path(item):
    """The page path of a nav item (`"x.md"` or `{"Title": "x.md"}`), else None."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and len(item) == 1:
        value = next(iter(item.values()))
        if isinstance(value, str):
            return value
    return None


def _filter_examples(items, available: dict[str, Path]):
    """Drops notebooks that do not exist; titles the others (unless titled in
    `mkdocs.yml`) by their first heading."""
    kept, named = [], set()
    for item in items:
        path = _nav_item_path(item)
        if path is not None and path.startswith(EXAMPLES_DIR + "/") and path.endswith(".ipynb"):
            if path not in available:
                log.info("Notebook %s not found in notebooks/: left out of the nav.", path)
                continue
            named.add(path)
            if isinstance(item, str):
                item = {_notebook_title(available[path]): path}
        kept.append(item)
    return kept, named


def on_config(config, **kwargs):
    available = {f"{EXAMPLES_DIR}/{p.name}": p for p in _notebooks()}
    nav = config.get("nav")
    if nav is not None:
        new_nav = []
        for entry in nav:
            if isinstance(entry, dict) and EXAMPLES_SECTION in entry:
                kept, named = _filter_examples(entry[EXAMPLES_SECTION], available)
                for path, nb in available.items():
                    if path not in named:
                        kept.append({_notebook_title(nb): path})
                if kept:
                    new_nav.append({EXAMPLES_SECTION: kept})
            else:
                new_nav.append(entry)
        config["nav"] = new_nav
    # Rebuild on changes to the sources of generated pages when serving.
    for path in (NOTEBOOKS, RESULTS):
        if path.is_dir() and str(path) not in config["watch"]:
            config["watch"].append(str(path))
    return config


# Before mkdocs-jupyter's own `on_files` (priority 0), which turns `.ipynb` files into
# pages.
@event_priority(50)
def on_files(files, config, **kwargs):
    for nb in _notebooks():
        uri = f"{EXAMPLES_DIR}/{nb.name}"
        if files.get_file_from_path(uri) is None:
            # A file of the repository root rather than a generated one: mkdocs-jupyter
            # wraps it and reads it through `src_dir`.
            files.append(
                File(
                    uri,
                    src_dir=str(ROOT),
                    dest_dir=config["site_dir"],
                    use_directory_urls=config["use_directory_urls"],
                )
            )
    for png in _result_plots():
        uri = f"benchmarks/results/{png.name}"
        if files.get_file_from_path(uri) is None:
            files.append(File.generated(config, uri, abs_src_path=str(png)))
    return files


def _result_plots() -> list[Path]:
    return sorted(RESULTS.glob("*.png")) if RESULTS.is_dir() else []


def _result_key(path: Path):
    for i, prefix in enumerate(RESULTS_ORDER):
        if path.name.startswith(prefix):
            return (i, path.name)
    return (len(RESULTS_ORDER), path.name)


def _demote(markdown: str, levels: int) -> str:
    """Moves ATX headings down `levels` levels (outside fenced code)."""
    out, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        if not fenced:
            match = re.match(r"^(#{1,6})(\s.*)$", line)
            if match:
                line = "#" * min(6, len(match.group(1)) + levels) + match.group(2)
        out.append(line)
    return "\n".join(out)


def _results_markdown() -> str:
    parts = []
    plots = _result_plots()
    if plots:
        parts.append("## Plots\n")
        for png in plots:
            caption = png.stem.replace("_", " ")
            parts.append(f"![{caption}](benchmarks/results/{png.name})\n")
    files = sorted(RESULTS.glob("*.md"), key=_result_key) if RESULTS.is_dir() else []
    if not files:
        parts.append("*No benchmark results are committed yet.*\n")
    for path in files:
        text = _demote(path.read_text(encoding="utf-8"), 1)
        # Name the source file in the section heading: reruns of one benchmark (e.g. on
        # two Python versions) share a title.
        text = re.sub(
            r"^## (.*)$", lambda m: f"## {m.group(1)} ({path.stem})", text, count=1,
            flags=re.M,
        )
        parts.append(f"<!-- from benchmarks/results/{path.name} -->\n{text}\n")
    return "\n".join(parts)


def on_page_markdown(markdown, page, config, files, **kwargs):
    if page.file.src_uri == BENCHMARK_PAGE and RESULTS_MARKER in markdown:
        return markdown.replace(RESULTS_MARKER, _results_markdown())
    return markdown
