"""scripts/run_notebook.py: an executed notebook must carry the figures its cells show."""
import importlib.util
from pathlib import Path

import nbformat

_spec = importlib.util.spec_from_file_location("run_notebook", Path(__file__).parents[1] / "scripts" / "run_notebook.py")
run_notebook = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_notebook)


def test_missing_figures_finds_plot_cells_without_an_image():
    v4 = nbformat.v4
    image = v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"})
    nb = v4.new_notebook(cells=[
        v4.new_markdown_cell("plt.show()"),                                  # not code
        v4.new_code_cell("import matplotlib.pyplot as plt\nplt.plot([1])\nplt.show()"),  # drawn by a non-inline backend
        v4.new_code_cell("plt.plot([1])\nplt.show()", outputs=[image]),
        v4.new_code_cell("print(1)", outputs=[v4.new_output("stream", text="1\n")]),
    ])
    assert run_notebook._missing_figures(nb) == [1]
