"""Figures written beside results: PR curves and training histories (PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_pr_curves(curves: dict[str, dict], path: str | Path) -> None:
    """One precision-recall curve over Hamming radius per label; `curves[label]` = report.to_dict()['pr_curve']."""
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for label, curve in curves.items():
        ax.plot(curve["recall"], curve["precision"], marker=".", label=label)
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title="Precision-recall over Hamming radius")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
