"""Small figure helpers shared by every stage: loss curves and image grids, written atomically as PNG.

Matplotlib runs on the Agg backend (no display needed) and each figure is rendered to memory and then
renamed into place, so a crash never leaves half a PNG.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # after choosing the backend
import numpy as np
from matplotlib.ticker import MaxNLocator

from frmdn_worldmodels.runtime.io import atomic_write_bytes

Series = (
    Sequence[float]
    | tuple[Sequence[float], Sequence[float]]
    | tuple[Sequence[float], Sequence[float], Sequence[float]]
)


def _xy(values: Series) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``[y0, y1, ...]`` (x = 0, 1, ...), ``(xs, ys)`` or ``(xs, ys, errors)`` (error bars of +- errors)."""
    if isinstance(values, tuple) and len(values) in (2, 3) and np.ndim(values[0]) == 1:
        xs, ys = np.asarray(values[0], dtype=float), np.asarray(values[1], dtype=float)
        errors = np.asarray(values[2], dtype=float) if len(values) == 3 else None
        return xs, ys, errors
    ys = np.asarray(values, dtype=float)
    return np.arange(len(ys), dtype=float), ys, None


def _save(figure: plt.Figure, path: str | Path) -> None:
    """``figure``, laid out, as a PNG at ``path`` (written atomically)."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())


def plot_curves(
    path: str | Path,
    series: Mapping[str, Series],
    xlabel: str = "step",
    ylabel: str = "loss",
    title: str = "",
    logy: bool = False,
    styles: Mapping[str, dict] | None = None,
    integer_x: bool = False,
    right: Mapping[str, Series] | None = None,
    right_label: str = "",
) -> None:
    """One line per named series (a list of y values, an ``(xs, ys)`` pair or an ``(xs, ys, errors)`` triple
    drawn with error bars), as a PNG at ``path``. ``styles``: matplotlib keywords per series name (colour,
    line style); ``integer_x``: ticks at whole numbers only; ``right``: series of another scale, drawn dashed
    against a second y axis on the right labelled ``right_label``."""
    figure, axes = plt.subplots(figsize=(6.4, 4.8 if right else 4.0), dpi=100)
    try:
        colours = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])
        twin = axes.twinx() if right else None
        lines = []
        for panel, named in ((axes, series), (twin, right or {})):
            for name, values in named.items():
                xs, ys, errors = _xy(values)
                if len(ys) == 0:
                    continue
                # markers keep short series (a single point would be an invisible line) readable
                marker = "o" if len(ys) < 30 else None
                style = {"marker": marker, "markersize": 3, "color": next(colours)}
                if panel is twin:
                    style["linestyle"] = "--"
                style.update((styles or {}).get(name, {}))
                if errors is None:
                    lines += panel.plot(xs, ys, label=name, **style)
                else:
                    lines.append(panel.errorbar(xs, ys, yerr=errors, label=name, capsize=3, **style))
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        if twin is not None:
            twin.set_ylabel(right_label)
        if title:
            axes.set_title(title)
        if logy:
            axes.set_yscale("log")
        if integer_x:
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        if lines:
            # with two scales no corner inside is free: the legend goes below the axes
            below = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.14), "ncol": 2} if twin else {}
            axes.legend(lines, [line.get_label() for line in lines], **below)
        axes.grid(alpha=0.3)
        _save(figure, path)
    finally:
        plt.close(figure)


def plot_scatter(
    path: str | Path,
    groups: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float], Sequence[float]]],
    xlabel: str,
    ylabel: str,
    title: str = "",
    diagonal: bool = False,
) -> None:
    """One colour of points per named group ``(xs, ys, x errors, y errors)``, each point with error bars of
    +- its errors, as a PNG at ``path``; ``diagonal``: the line y = x across the points' range."""
    figure, axes = plt.subplots(figsize=(6.4, 5.2), dpi=100)
    try:
        colours = itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])
        values = []
        for name, (xs, ys, x_errors, y_errors) in groups.items():
            xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
            if len(xs) == 0:
                continue
            axes.errorbar(
                xs,
                ys,
                xerr=x_errors,
                yerr=y_errors,
                fmt="o",
                markersize=4,
                capsize=2,
                elinewidth=0.8,
                alpha=0.85,
                color=next(colours),
                label=name,
            )
            values += [*xs, *ys]
        if diagonal and values:
            low, high = float(np.nanmin(values)), float(np.nanmax(values))
            pad = 0.05 * (high - low) or 1.0
            axes.plot(
                [low - pad, high + pad],
                [low - pad, high + pad],
                color="grey",
                linestyle="--",
                linewidth=1,
                label="y = x",
            )
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        if title:
            axes.set_title(title)
        axes.legend(fontsize="small")
        axes.grid(alpha=0.3)
        _save(figure, path)
    finally:
        plt.close(figure)


def image_grid(rows: Sequence[Sequence[np.ndarray]], pad: int = 2, scale: int = 1) -> np.ndarray:
    """Tile uint8 images ``[H, W, 3]`` (or ``[H, W]``) row by row on a white background, enlarged
    ``scale`` x."""
    rows = [[_as_rgb_uint8(image) for image in row] for row in rows if len(row) > 0]
    if not rows:
        raise ValueError("image_grid: no images")
    height = max(image.shape[0] for row in rows for image in row)
    width = max(image.shape[1] for row in rows for image in row)
    columns = max(len(row) for row in rows)
    grid = np.full((len(rows) * (height + pad) + pad, columns * (width + pad) + pad, 3), 255, dtype=np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            top, left = pad + r * (height + pad), pad + c * (width + pad)
            grid[top : top + image.shape[0], left : left + image.shape[1]] = image
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return grid


def save_image_grid(
    path: str | Path, rows: Sequence[Sequence[np.ndarray]], pad: int = 2, scale: int = 1
) -> None:
    """Write ``image_grid(rows)`` as a PNG at ``path`` (each row a list of uint8 images)."""
    buffer = io.BytesIO()
    plt.imsave(buffer, image_grid(rows, pad=pad, scale=scale), format="png")
    atomic_write_bytes(path, buffer.getvalue())


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        # floats in [0, 1]
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image_grid: expected [H, W, 3] or [H, W] images, got shape {image.shape}")
    return image
