"""The comparison figure: a 2-D projection of real and generated features, and the worst-covered classes.

Drawn on a bare matplotlib Figure with the Agg canvas: no pyplot, so no global figure state or backend switch
leaks into the caller. matplotlib is the optional `plot` extra; UMAP needs the optional `umap-learn`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import xarray as xr

from schemas.errors import ImzarrError

MAX_POINTS = 5000  # per side: more only hides the structure under overplotting and slows the SVD
WORST_CLASSES = 30
PROJECTIONS = ("pca", "umap")
REAL_COLOR, FAKE_COLOR = "#1f77b4", "#ff7f0e"


class PlotError(ImzarrError):
    """The figure cannot be drawn: a missing optional package or an unknown projection."""


def check_plotting(projection: str) -> None:
    """Fail before any heavy work when the figure could not be drawn: unknown projection or missing package."""
    if projection not in PROJECTIONS:
        raise PlotError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if importlib.util.find_spec("matplotlib") is None:
        raise PlotError("plotting needs matplotlib (pip install 'imzarr[plot]')")
    if projection == "umap" and importlib.util.find_spec("umap") is None:
        raise PlotError("projection 'umap' needs the optional umap-learn package (pip install umap-learn); or use 'pca'")


def project_2d(real: np.ndarray, fake: np.ndarray, projection: str = "pca") -> tuple[np.ndarray, np.ndarray, tuple[str, str]]:
    """Both sets in one shared 2-D embedding, plus axis labels.

    PCA: the top two principal axes of the pooled, centred features (NumPy eigh of the dim×dim scatter matrix).
    """
    check_plotting(projection)
    both = np.concatenate([real, fake]).astype(np.float64)
    if projection == "umap":
        import umap

        emb = umap.UMAP(n_components=2, random_state=0).fit_transform(both)
        labels = ("UMAP 1", "UMAP 2")
    else:
        centred = both - both.mean(axis=0)
        # The right singular vectors of X are the eigenvectors of XᵀX: a dim×dim eigh costs ~1 s where the SVD
        # of 10,000×768 rows took 13 s on 2 cores.
        eig, vec = np.linalg.eigh(centred.T @ centred)
        eig, vec = np.clip(eig[::-1], 0.0, None), vec[:, ::-1]
        emb = centred @ vec[:, :2]
        if emb.shape[1] < 2:  # one-dimensional features: a flat second axis
            emb = np.column_stack([emb, np.zeros(len(emb))])
        share = eig / max(float(eig.sum()), 1e-300)
        labels = tuple(f"PC{i + 1} ({share[i]:.1%} of variance)" if i < len(share) else f"PC{i + 1}" for i in range(2))
    return emb[: len(real)], emb[len(real) :], labels


def plot_comparison(
    real_feats_sample: np.ndarray,
    fake_feats_sample: np.ndarray,
    report_ds: xr.Dataset,
    path: str | Path,
    projection: str = "pca",
) -> Path:
    """Write the PNG: projection coloured by source (left) and per-class coverage of the worst classes (right)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("plotting needs matplotlib (pip install 'imzarr[plot]')") from None
    real, fake = _subsample(np.asarray(real_feats_sample)), _subsample(np.asarray(fake_feats_sample))
    emb_r, emb_f, axis_labels = project_2d(real, fake, projection)

    fig = Figure(figsize=(15, 8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax_points, ax_bars = fig.subplots(1, 2, width_ratios=[1.1, 1])
    ax_points.scatter(emb_r[:, 0], emb_r[:, 1], s=5, alpha=0.4, color=REAL_COLOR, label=f"real ({len(real):,} shown)", rasterized=True)
    ax_points.scatter(emb_f[:, 0], emb_f[:, 1], s=5, alpha=0.4, color=FAKE_COLOR, label=f"generated ({len(fake):,} shown)", rasterized=True)
    ax_points.set_xlabel(axis_labels[0])
    ax_points.set_ylabel(axis_labels[1])
    ax_points.set_title(f"{projection.upper()} of the features")
    ax_points.legend(loc="best", markerscale=3)
    _coverage_bars(ax_bars, report_ds)

    a = report_ds.attrs
    fig.suptitle(
        f"layer {a.get('layer')}: {_short(a.get('real_store'))} (real) vs {_short(a.get('fake_store'))} (generated)\n"
        f"FD {a.get('fd', np.nan):.4g}   precision {a.get('precision', np.nan):.3f}   recall {a.get('recall', np.nan):.3f}   "
        f"density {a.get('density', np.nan):.3f}   coverage {a.get('coverage', np.nan):.3f}   "
        f"(k={a.get('k')}, features: {a.get('pool')}, {a.get('n_real', 0):,} vs {a.get('n_fake', 0):,} samples)",
        fontsize=11,
    )
    out = Path(path)
    fig.savefig(out, format="png")
    return out


def _coverage_bars(ax, ds: xr.Dataset) -> None:
    if "coverage" not in ds or ds.sizes.get("class", 0) == 0:
        ax.text(0.5, 0.5, "no per-class metrics", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    coverage = ds["coverage"].values
    defined = np.flatnonzero(~np.isnan(coverage))
    order = defined[np.argsort(coverage[defined], kind="stable")][:WORST_CLASSES]
    if order.size == 0:
        ax.text(0.5, 0.5, "every class is too small for k-NN metrics", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    names = [f"{str(ds['class_name'].values[i]).split(',')[0][:28]} ({ds['synset'].values[i]})" for i in order.tolist()]
    y = np.arange(order.size)
    ax.barh(y, coverage[order], color=FAKE_COLOR, alpha=0.8)
    n_real, n_fake = ds["n_real"].values, ds["n_fake"].values
    for row, i in enumerate(order.tolist()):
        # The value is written out: a coverage of 0 has no visible bar.
        ax.text(coverage[i] + 0.01, row, f"{coverage[i]:.2f}  ({n_real[i]} real / {n_fake[i]} gen.)", va="center", fontsize=7)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()  # worst on top
    ax.set_xlim(0, 1.3)  # room for the value labels
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("coverage (fraction of real samples with a generated sample in their k-NN ball)")
    overall = ds.attrs.get("coverage")
    if overall is not None:
        ax.axvline(overall, color="k", linestyle="--", linewidth=1, label=f"overall {overall:.3f}")
        ax.legend(loc="lower right")
    ax.set_title(f"per-class coverage: {order.size} worst of {defined.size} classes")


def _subsample(x: np.ndarray) -> np.ndarray:
    if len(x) <= MAX_POINTS:
        return x
    rng = np.random.default_rng(0)
    return x[np.sort(rng.choice(len(x), size=MAX_POINTS, replace=False))]


def _short(url: object, limit: int = 48) -> str:
    text = str(url)
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]
