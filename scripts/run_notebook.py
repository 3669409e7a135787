"""Execute notebooks in place (outputs and execution counts committed), then strip widget state.

    python scripts/run_notebook.py notebooks/01_reparameterization.ipynb [...]

Widget state in notebook metadata breaks GitHub's renderer, so it is removed after execution (it is
recorded during execution because nbclient needs it for ipywidgets.Output).
"""
import os
import signal
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def _terminated(signum, frame):
    raise TimeoutError(f"terminated by signal {signum}")


def _missing_figures(nb) -> list[int]:
    """Code cells that call ``plt.show()`` but carry no image output."""
    return [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and "plt.show()" in c.source
            and not any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]


def run(path: Path, timeout: int = 1800) -> float:
    signal.signal(signal.SIGTERM, _terminated)  # `timeout` sends SIGTERM: keep the partial outputs
    # the kernel inherits this environment: with MPLBACKEND=agg (set for headless test runs) plt.show() draws
    # nothing into the notebook, so let ipykernel choose its inline backend
    if not os.environ.get("MPLBACKEND", "").endswith("backend_inline"):
        os.environ.pop("MPLBACKEND", None)
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except Exception:
        failed = path.with_suffix(".failed.ipynb")  # keep what ran, for diagnosis; never committed
        nbformat.write(nb, failed)
        print(f"{path}: FAILED, partial outputs in {failed}", flush=True)
        raise
    elapsed = time.perf_counter() - start
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)
    missing = _missing_figures(nb)
    if missing:
        raise RuntimeError(f"{path}: cells {missing} call plt.show() but have no figure output")
    return elapsed


if __name__ == "__main__":
    args = sys.argv[1:]
    cell_timeout = 1800
    if args and args[0].startswith("--timeout="):  # per-cell limit in seconds
        cell_timeout = int(args.pop(0).split("=", 1)[1])
    for arg in args:
        print(f"{arg}: executed in {run(Path(arg), cell_timeout):.1f} s", flush=True)
