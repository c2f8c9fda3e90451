"""Pictures of the data for the UI: thumbnail grids and histograms with thresholds drawn in.

Each picture is a small WebP embedded in markdown as a data URI (Dagster renders markdown
metadata, images included), so it travels in the event log: grids and charts are kept to a few
tens of KB (see README, "The UI"). matplotlib is imported only when a chart is drawn, so the
UI and the CLI start without it.
"""

from __future__ import annotations

import base64
import io
import math
import textwrap
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WEBP_QUALITY = 60
CHART_DPI = 96


@dataclass(frozen=True)
class Tile:
    """One thumbnail: stored image bytes; under it the caption and short facts ("aes 5.2"),
    two lines each."""

    image: bytes
    caption: str = ""
    facts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Panel:
    """One histogram: values (nulls dropped), optional highlighted subset, threshold lines."""

    name: str
    values: np.ndarray
    highlight: np.ndarray | None = None  # e.g. the rows a subset keeps
    thresholds: tuple[tuple[str, float], ...] = ()


def markdown_image(alt: str, data: bytes, mime: str = "image/webp") -> str:
    """An image inside markdown, as Dagster's own examples embed plots."""
    return f"![{alt}](data:{mime};base64,{base64.b64encode(data).decode()})"


def _webp(img: Image.Image, lossless: bool = False) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "WEBP", quality=WEBP_QUALITY, lossless=lossless, method=6)
    return buf.getvalue()


def thumbnail_grid(tiles: list[Tile], columns: int = 4, size: int = 112) -> bytes:
    """A grid of thumbnails with captions under each, as one WebP."""
    font = ImageFont.load_default(size=10)
    line_h, pad = 12, 6
    chars = max(8, size // 5)
    text_h = 4 * line_h + pad
    rows = max(1, math.ceil(len(tiles) / columns))
    grid = Image.new("RGB", (columns * (size + pad) + pad, rows * (size + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        x = pad + (i % columns) * (size + pad)
        y = pad + (i // columns) * (size + text_h + pad)
        try:
            with Image.open(io.BytesIO(tile.image)) as im:
                im.draft("RGB", (size, size))  # JPEG: decode at reduced scale
                thumb = im.convert("RGB")
                thumb.thumbnail((size, size))
            grid.paste(thumb, (x + (size - thumb.width) // 2, y + (size - thumb.height) // 2))
        except Exception:  # an undecodable stored image is itself worth seeing
            draw.rectangle((x, y, x + size - 1, y + size - 1), outline="red", width=2)
            draw.text((x + 4, y + size // 2), "undecodable", fill="red", font=font)
        lines = textwrap.wrap(textwrap.shorten(tile.caption, 2 * chars, placeholder="…"), chars)[:2] if tile.caption else []
        lines += _pack(tile.facts, chars)[:2]
        for k, line in enumerate(lines):
            draw.text((x, y + size + 2 + k * line_h), line[:chars], fill="black", font=font)
    return _webp(grid)


def _pack(facts: tuple[str, ...], width: int) -> list[str]:
    """Facts on lines of at most `width` characters, never splitting one."""
    lines: list[str] = []
    for fact in facts:
        if lines and len(lines[-1]) + 2 + len(fact) <= width:
            lines[-1] += "  " + fact
        else:
            lines.append(fact)
    return lines


def histograms(panels: list[Panel], columns: int = 3, title: str = "") -> bytes:
    """Histograms side by side, each with its thresholds as labelled vertical lines; a
    highlighted subset (e.g. rows kept) is drawn over the whole in colour."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # no pyplot: no global state, thread-safe

    panels = [p for p in panels if p.values.size]
    columns = max(1, min(columns, len(panels)))
    rows = max(1, math.ceil(len(panels) / columns))
    fig = Figure(figsize=(3.2 * columns, 2.2 * rows + (0.3 if title else 0)), dpi=CHART_DPI)
    if title:
        fig.suptitle(title, fontsize=10)
    for i, p in enumerate(panels):
        ax = fig.add_subplot(rows, columns, i + 1)
        values = p.values.astype(np.float64)
        lo, hi = float(values.min()), float(values.max())
        for _, t in p.thresholds:
            lo, hi = min(lo, t), max(hi, t)
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 31)
        ax.hist(values, bins=bins, color="#c9ccd1", label="all" if p.highlight is not None else None)
        if p.highlight is not None and p.highlight.size:
            ax.hist(p.highlight.astype(np.float64), bins=bins, color="#4f43dd", label="kept")
        for k, (label, t) in enumerate(p.thresholds):
            ax.axvline(t, color=("#d62728", "#ff7f0e", "#2ca02c", "#9467bd")[k % 4], lw=1.5, ls="--", label=label)
        ax.set_title(f"{p.name} (n={values.size}, median {np.median(values):.3g})", fontsize=8)
        ax.tick_params(labelsize=7)
        if p.thresholds or p.highlight is not None:
            ax.legend(fontsize=6, frameon=False)
    fig.tight_layout()
    return _chart_webp(fig)


def _chart_webp(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    with Image.open(buf) as png:
        # charts have few colours: a 64-colour palette keeps them sharp and small
        return _webp(png.convert("RGB").quantize(64).convert("RGB"), lossless=True)


def lines(series: dict[str, list[tuple[float, float]]], title: str = "", ylabel: str = "") -> bytes:
    """One line per series of (unix time, value) points, e.g. subset sizes over time."""
    import matplotlib

    matplotlib.use("Agg")
    from datetime import datetime, timedelta, timezone

    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 2.6), dpi=CHART_DPI)
    ax = fig.add_subplot()
    for name, points in sorted(series.items()):
        points = sorted(points)
        ax.plot([datetime.fromtimestamp(t, timezone.utc) for t, _ in points], [v for _, v in points], marker="o", ms=3, label=name)
    times = [t for points in series.values() for t, _ in points]
    if times and max(times) - min(times) < 3600:  # one summary so far: an hour around it, not weeks
        middle = datetime.fromtimestamp((max(times) + min(times)) / 2, timezone.utc)
        ax.set_xlim(middle - timedelta(minutes=30), middle + timedelta(minutes=30))
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, frameon=False)
    fig.autofmt_xdate()
    fig.tight_layout()
    return _chart_webp(fig)
