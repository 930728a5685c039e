"""What a run leaves for people to look at: its pictures beside the files, its metrics as a table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from vdsh.app.plots import plot_admm_convergence, plot_code_picture, plot_history, plot_layer_statistics
from vdsh.index.metrics import RetrievalReport
from vdsh.training.run import RunResult

console = Console()


def save_run(out: Path, result: RunResult) -> None:
    """What every training run leaves: the model, history, split (`RunResult.save`), and its pictures: history.png,
    codes.png (query codes sorted by class) and, for ADMM, admm_convergence.png and layers.png."""
    result.save(out)
    plot_history(result.history, out / "history.png")
    labels = np.asarray(result.inputs.images.labels)[result.inputs.split.query]
    plot_code_picture(result.query_codes.numpy(), labels, out / "codes.png")
    if result.history and all("lagrangian" in r for r in result.history):
        plot_admm_convergence(result.history, out / "admm_convergence.png")
        plot_layer_statistics(result.history, out / "layers.png")


def print_report(report: RetrievalReport, title: str) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in report.rows():
        table.add_row(name, f"{value:.4f}")
    console.print(table)
