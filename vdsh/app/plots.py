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


def legend_if_any(ax: plt.Axes) -> None:
    """A legend where the axes hold labelled curves (a one-step fit, e.g. SDH, records no history)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend()


def plot_history(history: list[dict], path: Path) -> None:
    """Objective, constraint residuals and mAP against wall time, one PNG."""
    t = [r["time"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for key in ("loss", "linear_penalty", "activation_penalty", "code_loss"):
        if any(key in r for r in history):
            axes[0].plot(t, [r.get(key, np.nan) for r in history], label=key)
    axes[0].set_yscale("log"), axes[0].set_title("objective terms"), legend_if_any(axes[0])
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
    axes[2].set_title("mAP@all (forward-pass codes)"), legend_if_any(axes[2])
    for ax in axes:
        ax.set_xlabel("wall time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_admm_convergence(history: list[dict], path: Path) -> None:
    """ADMM's convergence against sweeps: objective and augmented Lagrangian, residual per layer, multiplier norms."""
    sweeps = [r["sweep"] for r in history]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    for key in ("lagrangian", "loss", "penalty", "code_term"):
        axes[0].plot(sweeps, [r[key] for r in history], label=key)
    axes[0].set_yscale("symlog"), axes[0].set_title("augmented Lagrangian, terms (per sample)"), axes[0].legend()
    layer_curves(axes[1], sweeps, np.array([r["residuals"] for r in history]))
    axes[1].set_yscale("log"), axes[1].set_title("relative primal residual per layer")
    layer_curves(axes[2], sweeps, np.array([r["multiplier_norms"] for r in history]))
    axes[2].set_title("multiplier norm per layer (rms ||u_m||)")
    axes[3].plot(sweeps, [r["consensus_gap"] for r in history], label="||θ − θ̃_k|| / ||θ||")
    axes[3].plot(sweeps, [r["consensus_multiplier_norm"] for r in history], label="rms ||v_k||")
    axes[3].set_yscale("symlog", linthresh=1e-6), axes[3].set_title("consensus"), axes[3].legend()
    for ax in axes:
        ax.set_xlabel("sweep")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def layer_curves(ax, sweeps: list[int], values: np.ndarray) -> None:
    """One line per layer, coloured from the bottom (dark) to the top (light), with a colour bar for the layer."""
    colours = plt.cm.viridis(np.linspace(0, 1, values.shape[1]))
    for m in range(values.shape[1]):
        ax.plot(sweeps, values[:, m], color=colours[m], lw=1)
    bar = plt.cm.ScalarMappable(cmap="viridis", norm=plt.Normalize(1, values.shape[1]))
    plt.colorbar(bar, ax=ax, label="layer")


def plot_layer_statistics(history: list[dict], path: Path) -> None:
    """Per-layer pictures over sweeps (layers × sweeps): the fraction of active ReLU units and the mean output."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key, title in ((axes[0], "active_fraction", "fraction of active units"), (axes[1], "mean_output", "mean output z_m")):
        image = np.array([r[key] for r in history]).T
        shown = ax.imshow(image, aspect="auto", origin="lower", cmap="magma",
                          extent=(history[0]["sweep"] - 0.5, history[-1]["sweep"] + 0.5, 0.5, image.shape[0] + 0.5))
        ax.set(xlabel="sweep", ylabel="hidden layer", title=title)
        fig.colorbar(shown, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_code_picture(codes: np.ndarray, labels: np.ndarray, path: Path) -> None:
    """Hash codes of a query set sorted by class, one row per image (white +1, black −1), class boundaries marked."""
    order = np.argsort(labels.argmax(1), kind="stable")
    classes = labels.argmax(1)[order]
    fig, ax = plt.subplots(figsize=(6, 8))
    ax.imshow(codes[order] > 0, aspect="auto", cmap="gray", interpolation="nearest")
    for row in np.flatnonzero(np.diff(classes)) + 0.5:
        ax.axhline(row, color="red", lw=0.6)
    ax.set(xlabel="bit", ylabel="query (sorted by class)", title="Codes of the queries, by class")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
