"""The comparison figure: a 2-D projection of real and generated features coloured by class, and the per-class
Fréchet distance and coverage of the worst-covered classes, under a title that says where everything came from.

Drawn on a bare matplotlib Figure with the Agg canvas: no pyplot, so no global figure state or backend switch
leaks into the caller. matplotlib is the optional `plot` extra; UMAP needs the optional `umap-learn`.
"""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import numpy as np
import xarray as xr

from schemas.errors import ImzarrError
from schemas.output_paths import write_output_file
from schemas.variable_attrs import label_names

MAX_POINTS = 5000  # per side: more only hides the structure under overplotting and slows the SVD
WORST_CLASSES = 30
PROJECTIONS = ("pca", "umap")
LEGEND_CLASSES = 20  # beyond this a legend of classes hides the points
FIGURE_WIDTH_IN, FIGURE_HEIGHT_IN, DPI = 18, 9, 100
FD_COLOR, COVERAGE_COLOR, MUTED_COLOR = "#7f7f7f", "#ff7f0e", "#444444"
UNTRAINED_COLOR = "#d62728"
UNTRAINED_BANNER = "UNTRAINED MODEL (random weights): these features say nothing about real or generated images"


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
    real_labels: np.ndarray | None = None,
    fake_labels: np.ndarray | None = None,
) -> str:
    """Write the PNG: the projection coloured by class with source as marker (left), per-class Fréchet distance
    and coverage of the worst-covered classes (middle, right), and the provenance in the title."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("plotting needs matplotlib (pip install 'imzarr[plot]')") from None
    real, real_labels = _subsample(np.asarray(real_feats_sample), real_labels)
    fake, fake_labels = _subsample(np.asarray(fake_feats_sample), fake_labels)
    emb_r, emb_f, axis_labels = project_2d(real, fake, projection)

    fig = Figure(figsize=(FIGURE_WIDTH_IN, FIGURE_HEIGHT_IN), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax_points, ax_fd, ax_cov = fig.subplots(1, 3, width_ratios=[1.25, 0.6, 0.75])
    _projection_panel(ax_points, emb_r, emb_f, real_labels, fake_labels, report_ds, projection, axis_labels)
    order = _worst_covered(report_ds)
    _fd_bars(ax_fd, report_ds, order)
    _coverage_bars(ax_cov, report_ds, order)
    _title(fig, report_ds)
    png = io.BytesIO()
    fig.savefig(png, format="png")
    return write_output_file(str(path), png.getvalue())


def _projection_panel(ax, emb_r, emb_f, real_labels, fake_labels, ds: xr.Dataset, projection: str, axis_labels) -> None:
    """Points coloured by class (the same colour on both sides), real as dots and generated as crosses."""
    if real_labels is None or fake_labels is None:
        real_labels, fake_labels = np.full(len(emb_r), -1), np.full(len(emb_f), -1)
    classes = np.unique(np.concatenate([real_labels, fake_labels]))
    names = _class_names(classes, ds)
    colours = _class_colours(classes)
    for marker, emb, labels, size in (("o", emb_r, real_labels, 9), ("x", emb_f, fake_labels, 14)):
        colour = np.array([colours[int(c)] for c in labels]).reshape(-1, 4)
        ax.scatter(emb[:, 0], emb[:, 1], s=size, alpha=0.55, c=colour, marker=marker, linewidths=0.8, rasterized=True)
    handles = [ax.scatter([], [], marker="o", color=MUTED_COLOR, s=20, label=f"real ({len(emb_r):,} shown)"),
               ax.scatter([], [], marker="x", color=MUTED_COLOR, s=30, label=f"generated ({len(emb_f):,} shown)")]
    if classes.size <= LEGEND_CLASSES:
        handles += [ax.scatter([], [], marker="s", color=colours[int(c)], s=30, label=names[int(c)])
                    for c in classes.tolist()]
    ax.legend(handles=handles, loc="best", fontsize=7, framealpha=0.8, ncols=1 if len(handles) <= 8 else 2)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    by_class = "coloured by class" if classes.size <= LEGEND_CLASSES else f"coloured by class ({classes.size} classes, no legend)"
    ax.set_title(f"{projection.upper()} of the features, {by_class}", fontsize=10)


def _class_colours(classes: np.ndarray) -> dict[int, tuple[float, float, float, float]]:
    """A colour per class: tab10/tab20 while they are distinguishable, an evenly spread colour wheel beyond."""
    from matplotlib import colormaps

    n = max(int(classes.size), 1)
    if n <= 10:
        cmap, positions = colormaps["tab10"], np.arange(n) / 10 + 0.05
    elif n <= 20:
        cmap, positions = colormaps["tab20"], np.arange(n) / 20 + 0.025
    else:
        cmap, positions = colormaps["hsv"], np.arange(n) / n
    return {int(c): tuple(cmap(float(x))) for c, x in zip(classes.tolist(), positions)}


def _class_names(labels: np.ndarray, ds: xr.Dataset) -> dict[int, str]:
    """Names of the labels plotted: as the report names them (the stores' own classes), else from the ImageNet-1k
    table (a class in one store only is not in the report)."""
    reported = dict(zip(ds["label"].values.tolist(), ds["class_name"].values.tolist())) if "class_name" in ds.coords else {}
    _, table_names = label_names(labels, {})
    names = {}
    for label, name in zip(labels.tolist(), table_names):
        names[label] = reported.get(label) or str(name) or ("unknown class" if label < 0 else f"class {label}")
    return names


def _worst_covered(ds: xr.Dataset) -> np.ndarray:
    """Positions along `label` of the classes with the lowest defined coverage, worst first."""
    if "coverage" not in ds or ds.sizes.get("label", 0) == 0:
        return np.zeros(0, dtype=np.int64)
    coverage = ds["coverage"].values
    defined = np.flatnonzero(~np.isnan(coverage))
    return defined[np.argsort(coverage[defined], kind="stable")][:WORST_CLASSES]


def _row_names(ds: xr.Dataset, order: np.ndarray) -> list[str]:
    return [f"{str(ds['class_name'].values[i])[:28]} ({ds['synset'].values[i]})" for i in order.tolist()]


def _empty_panel(ax, ds: xr.Dataset, what: str) -> None:
    message = "no per-class metrics" if ds.sizes.get("label", 0) == 0 else "every class is too small for k-NN metrics"
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_title(what, fontsize=10)
    ax.set_axis_off()


def _fd_bars(ax, ds: xr.Dataset, order: np.ndarray) -> None:
    """Per-class Fréchet distance of the same classes as the coverage panel, in the same rows."""
    if order.size == 0 or "fd" not in ds:
        _empty_panel(ax, ds, "per-class Fréchet distance")
        return
    fd = ds["fd"].values[order]
    y = np.arange(order.size)
    shown = np.where(np.isfinite(fd), fd, 0.0)
    ax.barh(y, shown, color=FD_COLOR, alpha=0.8)
    right = float(shown.max()) if shown.size and shown.max() > 0 else 1.0
    for row, value in enumerate(fd.tolist()):
        ax.text(max(value, 0.0) + right * 0.02 if np.isfinite(value) else right * 0.02, row, f"{value:.3g}" if np.isfinite(value) else "n/a",
                va="center", fontsize=7)
    ax.set_yticks(y, _row_names(ds, order), fontsize=8)
    ax.invert_yaxis()  # worst coverage on top, as in the coverage panel
    ax.set_xlim(0, right * 1.35)
    ax.set_xlabel("Fréchet distance (lower is closer)")
    overall = ds.attrs.get("fd")
    ax.set_title("per-class FD" + (f" (overall {overall:.3g})" if overall is not None else ""), fontsize=10)


def _coverage_bars(ax, ds: xr.Dataset, order: np.ndarray) -> None:
    if order.size == 0:
        _empty_panel(ax, ds, "per-class coverage")
        return
    coverage = ds["coverage"].values
    defined = int(np.isfinite(coverage).sum())
    y = np.arange(order.size)
    ax.barh(y, coverage[order], color=COVERAGE_COLOR, alpha=0.8)
    n_real, n_fake = ds["n_real"].values, ds["n_fake"].values
    for row, i in enumerate(order.tolist()):
        # The value is written out: a coverage of 0 has no visible bar.
        ax.text(coverage[i] + 0.01, row, f"{coverage[i]:.2f}  ({n_real[i]} real / {n_fake[i]} gen.)", va="center", fontsize=7)
    ax.set_yticks(y, [""] * order.size)  # the FD panel beside it names the rows
    ax.invert_yaxis()
    ax.set_xlim(0, 1.45)  # room for the value labels
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("coverage: real k-NN balls reached")
    overall = ds.attrs.get("coverage")
    if overall is not None:
        ax.axvline(overall, color="k", linestyle="--", linewidth=1, label=f"overall {overall:.3f}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"per-class coverage: {order.size} worst of {defined} classes", fontsize=10)


def _title(fig, ds: xr.Dataset) -> None:
    """Provenance on the figure itself: layer and module, both stores, model, σ, the metrics; UNTRAINED in red."""
    a = ds.attrs
    lines = [
        f"layer {a.get('layer')} ({a.get('module_path', '?')}), features: {a.get('pool')}, k={a.get('k')}   "
        f"FD {a.get('fd', np.nan):.4g}   precision {a.get('precision', np.nan):.3f}   recall {a.get('recall', np.nan):.3f}   "
        f"density {a.get('density', np.nan):.3f}   coverage {a.get('coverage', np.nan):.3f}",
        f"real {_short(a.get('real_store'))} ({a.get('n_real', 0):,} samples, σ = {a.get('real_sigma', '?')})   vs   "
        f"generated {_short(a.get('fake_store'))} ({a.get('n_fake', 0):,} samples, σ = {a.get('fake_sigma', '?')})",
        f"model: {a.get('model', 'not recorded')}",
    ]
    fig.suptitle("\n".join(lines), fontsize=10)
    if a.get("trained") is not True:
        # supxlabel, not free text: the constrained layout makes room for it below the panels.
        fig.supxlabel(UNTRAINED_BANNER, color=UNTRAINED_COLOR, fontsize=13, fontweight="bold")


def _subsample(x: np.ndarray, labels: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    if len(x) <= MAX_POINTS:
        return x, labels
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(len(x), size=MAX_POINTS, replace=False))
    return x[keep], None if labels is None else np.asarray(labels)[keep]


def _short(url: object, limit: int = 48) -> str:
    text = str(url)
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]
