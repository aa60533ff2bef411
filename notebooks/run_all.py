"""Execute the example notebooks (CI: the small configuration).

    python notebooks/run_all.py                        # all notebooks, small configuration
    python notebooks/run_all.py quickstart             # one notebook
    python notebooks/run_all.py --size medium --write  # re-run and save the outputs

Each notebook reads its configuration from the environment variable
`DIFFRAX_DEER_NOTEBOOK_SIZE` (`small`, `medium` or `full`; `DIFFRAX_DEER_NOTEBOOK_SMALL=1`
means `small`); this script sets it for the kernels it starts. Without `--write` the
notebooks on disk are left untouched. Exits non-zero if any cell raises.
Needs the `examples` extra: `pip install -e ".[examples]"`.
"""

import argparse
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


HERE = Path(__file__).resolve().parent
NOTEBOOKS = ["quickstart", "neural_ode", "hamiltonian_nn", "gru_classification"]


def _apply_carriage_returns(text: str) -> str:
    """What a terminal shows for text with `\\r` (tqdm's progress bars): each line keeps
    only what follows its last carriage return."""
    lines = text.split("\n")
    return "\n".join(re.split(r"\r(?!$)", line)[-1].rstrip("\r") for line in lines)


def _clean_outputs(nb) -> None:
    """Merge consecutive stream outputs of a cell and resolve their carriage returns,
    so that a progress bar is stored as its final state."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        merged = []
        for output in cell.get("outputs", []):
            previous = merged[-1] if merged else None
            if (
                output.get("output_type") == "stream"
                and previous is not None
                and previous.get("output_type") == "stream"
                and previous.get("name") == output.get("name")
            ):
                previous["text"] += output["text"]
            else:
                merged.append(output)
        for output in merged:
            if output.get("output_type") == "stream":
                output["text"] = _apply_carriage_returns(output["text"])
        cell["outputs"] = merged


def run(name: str, size: str, write: bool, timeout: int) -> float:
    path = HERE / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    os.environ["DIFFRAX_DEER_NOTEBOOK_SIZE"] = size
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(HERE)}},
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    if write:
        _clean_outputs(nb)
        nbformat.write(nb, path)
    return elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", default=NOTEBOOKS, help="names (default: all)")
    parser.add_argument("--size", choices=["small", "medium", "full"], default="small")
    parser.add_argument("--write", action="store_true", help="save the executed notebooks")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    args = parser.parse_args(argv)
    failed = []
    total = 0.0
    for name in args.notebooks:
        name = Path(name).stem
        print(f"{name}.ipynb ({args.size}) ...", flush=True)
        try:
            elapsed = run(name, args.size, args.write, args.timeout)
        except Exception as e:  # a cell raised: report it and go on with the others
            print(f"  FAILED: {type(e).__name__}: {e}", flush=True)
            failed.append(name)
            continue
        total += elapsed
        print(f"  ok in {elapsed:.1f} s", flush=True)
    print(f"{len(args.notebooks) - len(failed)}/{len(args.notebooks)} notebooks ran "
          f"({total:.1f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
