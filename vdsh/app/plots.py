"""Figures written beside results: PR curves and training histories (PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


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


def plot_history(history: list[dict], path: Path) -> None:
    """Objective, constraint residuals and mAP against wall time, one PNG."""
    t = [r["time"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for key in ("loss", "linear_penalty", "activation_penalty", "code_loss"):
        if any(key in r for r in history):
            axes[0].plot(t, [r.get(key, np.nan) for r in history], label=key)
    axes[0].set_yscale("log"), axes[0].set_title("objective terms"), axes[0].legend()
    with_residuals = [r for r in history if "residual_max" in r]  # a hybrid's trunk epochs have none
    if with_residuals:
        axes[1].plot([r["time"] for r in with_residuals], [r["residual_max"] for r in with_residuals], label="max layer")
        axes[1].plot([r["time"] for r in with_residuals], [r["residual_mean"] for r in with_residuals], label="mean")
        axes[1].set_yscale("log"), axes[1].legend()
    axes[1].set_title("relative residual ||z_m - f(z_{m-1})||")
    for key in ("train_map", "val_map"):
        pts = [(r["time"], r[key]) for r in history if key in r]
        if pts:
            axes[2].plot(*zip(*pts), marker="o", label=key)
    axes[2].set_title("mAP@all (forward-pass codes)"), axes[2].legend()
    for ax in axes:
        ax.set_xlabel("wall time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
