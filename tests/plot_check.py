"""A matplotlib backend for the tests (MPLBACKEND=module://plot_check, with tests/ on PYTHONPATH): Agg, and each
PNG a notebook saves adds one JSON line to $PLOT_CHECK_LOG with, for each of its plots, the title and what each axis
says (its label, else its tick labels). figures_that_do_not_explain_themselves reads the log."""
import json
import os
import re
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg, _BackendAgg


def axis_says(label: str, ticks: list[str]) -> bool:
    """An axis says what it shows by its label or by ticks that are names (a bar per task), not only numbers."""
    return bool(label.strip()) or any(re.search(r"[A-Za-z]", tick) for tick in ticks)


class FigureCanvasChecked(FigureCanvasAgg):
    def print_png(self, filename_or_obj, *, metadata=None, pil_kwargs=None, **_figure_settings):
        """matplotlib hands a backend outside its package dpi, facecolor and such too; Agg's reads them itself."""
        result = super().print_png(filename_or_obj, metadata=metadata, pil_kwargs=pil_kwargs)
        suptitle = self.figure._suptitle.get_text() if self.figure._suptitle else ""
        plots = [{"title": ax.get_title() or suptitle,
                  "x": axis_says(ax.get_xlabel(), [t.get_text() for t in ax.get_xticklabels()]),
                  "y": axis_says(ax.get_ylabel(), [t.get_text() for t in ax.get_yticklabels()])}
                 for ax in self.figure.axes if ax.has_data()]
        with open(os.environ["PLOT_CHECK_LOG"], "a") as log:
            log.write(json.dumps({"file": str(filename_or_obj), "plots": plots}) + "\n")
        return result


@_BackendAgg.export
class _BackendChecked(_BackendAgg):
    FigureCanvas = FigureCanvasChecked


def figures_that_do_not_explain_themselves(log: Path) -> list[str]:
    """Each saved plot needs a title and axes that say what they show."""
    problems = []
    for line in log.read_text().splitlines():
        figure = json.loads(line)
        for plot in figure["plots"]:
            missing = [what for what in ("title", "x", "y") if not plot[what]]
            if missing:
                problems.append(f"{Path(figure['file']).name}: a plot without {', '.join(missing)}")
    return problems
