"""Pictures of the data for the UI: thumbnail grids and histograms with thresholds drawn in.

Each picture is a small WebP embedded in markdown as a data URI (Dagster renders markdown
metadata, images included), so it travels in the event log: grids and charts are kept to a few
tens of KB (docs/UI.md). matplotlib is imported only when a picture is drawn (its
charts; the caption font it ships), so the UI and the CLI start without it.
"""

from __future__ import annotations

import base64
import functools
import io
import itertools
import math
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

WEBP_QUALITY = 60
CHART_DPI = 96
FONT_SIZE, LINE_H, PAD = 9, 12, 6  # captions in DejaVu Sans 9 px: ~24 characters per 112 px tile
CAPTION_LINES, FACT_LINES = 2, 3


@dataclass(frozen=True)
class Tile:
    """One thumbnail: stored image bytes; under it the caption (two lines) and short facts
    ("aesthetic 5.42", three lines; those that do not fit are left out, the first shown)."""

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


TEXT_H = (CAPTION_LINES + FACT_LINES) * LINE_H + PAD  # under each tile


def tile_origin(i: int, columns: int = 4, size: int = 112) -> tuple[int, int]:
    """Top-left corner of tile `i` in a grid; its caption starts `size + 2` pixels below."""
    return PAD + (i % columns) * (size + PAD), PAD + (i // columns) * (size + TEXT_H + PAD)


def thumbnail_grid(tiles: list[Tile], columns: int = 4, size: int = 112) -> bytes:
    """A grid of thumbnails with captions and facts under each, as one WebP."""
    rows = max(1, math.ceil(len(tiles) / columns))
    grid = Image.new("RGB", (columns * (size + PAD) + PAD, rows * (size + TEXT_H + PAD) + PAD), "white")
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        x, y = tile_origin(i, columns, size)
        try:
            with Image.open(io.BytesIO(tile.image)) as im:
                im.draft("RGB", (size, size))  # JPEG: decode at reduced scale
                thumb = im.convert("RGB")
                thumb.thumbnail((size, size))
            grid.paste(thumb, (x + (size - thumb.width) // 2, y + (size - thumb.height) // 2))
        except Exception:  # an undecodable stored image is itself worth seeing
            draw.rectangle((x, y, x + size - 1, y + size - 1), outline="red", width=2)
            draw.text((x + 4, y + size // 2), "undecodable", fill="red", font=caption_font())
        grid.paste(text_image(caption_lines(tile.caption, size) + fact_lines(tile.facts, size), size), (x, y + size + 2))
    return _webp(grid)


@functools.cache
def preload() -> None:
    """Import matplotlib and load the caption font in a background thread, while the stage
    computes: ~1.5 s of imports that otherwise come after the shard is published, between the
    last image and the end of the run. Once a process: later stages find them loaded."""
    threading.Thread(target=_load, name="pictures-preload", daemon=True).start()


def _load() -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.figure  # noqa: F401 - the import is the point

        caption_font()
        _glyphs()
    except Exception:  # noqa: BLE001 - the view draws later and logs what fails there
        pass


@functools.cache
def caption_font() -> ImageFont.FreeTypeFont:
    """DejaVu Sans, the font matplotlib ships (so no font to install): Latin, Greek, Cyrillic,
    Armenian, Georgian, Hebrew, Arabic and symbols. PIL's default font has Latin only and draws
    every other letter as the same box."""
    return ImageFont.truetype(_font_path(), FONT_SIZE)


@functools.cache
def _glyphs() -> frozenset[int]:
    """The code points DejaVu Sans has a glyph for."""
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(_font_path()).get_charmap())


def _font_path() -> str:
    import matplotlib

    return str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf")


def legible(text: str) -> str:
    """`text` with each run of characters DejaVu Sans has no glyph for (CJK, Thai, Devanagari...)
    replaced by its script and length, e.g. "木の椅子" -> "[cjk×4]": a caption in a script the
    font lacks says what it is, instead of a row of identical boxes, and no other font is assumed
    installed."""
    glyphs = _glyphs()
    parts = []
    for covered, run in itertools.groupby(" ".join(text.split()), lambda ch: ord(ch) in glyphs):
        run = "".join(run)
        parts.append(run if covered else f"[{_script(run[0])}×{len(run)}]")
    return "".join(parts)


def _script(ch: str) -> str:
    """A letter's script as the first word of its Unicode name (CJK, HIRAGANA, THAI...)."""
    name = unicodedata.name(ch, "")
    return name.split()[0].lower() if name and unicodedata.category(ch)[0] in "LM" else "symbol"


def caption_lines(caption: str, width: int) -> list[str]:
    """The caption as drawn under a tile: legible, word-wrapped to `width` pixels on at most
    CAPTION_LINES lines, cut with "…" where there is more."""
    font, words, lines = caption_font(), legible(caption).split(), []
    while words and len(lines) < CAPTION_LINES:
        line = words.pop(0)
        while words and font.getlength(f"{line} {words[0]}") <= width:
            line += " " + words.pop(0)
        lines.append(line)
    if words:
        lines[-1] += " " + words[0]  # too long now: cut with "…" below
    return [_cut(line, width) for line in lines]


def fact_lines(facts: tuple[str, ...], width: int) -> list[str]:
    """Facts packed in order on at most FACT_LINES lines of `width` pixels, never splitting one,
    so the first facts are the ones always shown; a fact too wide keeps its value (last word)."""
    font, lines = caption_font(), []
    for fact in facts:
        if lines and font.getlength(f"{lines[-1]}  {fact}") <= width:
            lines[-1] += "  " + fact
        elif len(lines) < FACT_LINES:
            name, _, value = fact.rpartition(" ")
            lines.append(_cut(name, width, f" {value}") if name else _cut(value, width))
    return lines


def _cut(text: str, width: int, keep: str = "") -> str:
    """`text` + `keep` within `width` pixels, `text` cut with "…" if need be."""
    font = caption_font()
    if font.getlength(text + keep) <= width:
        return text + keep
    while text and font.getlength(f"{text}…{keep}") > width:
        text = text[:-1]
    return f"{text.rstrip()}…{keep}"


def text_image(lines: list[str], width: int) -> Image.Image:
    """Lines of text drawn LINE_H apart on white, as under a tile: what a test compares with a
    grid cut out of a page."""
    img = Image.new("RGB", (width, max(1, len(lines)) * LINE_H), "white")
    draw = ImageDraw.Draw(img)
    for k, line in enumerate(lines):
        draw.text((0, k * LINE_H), line, fill="black", font=caption_font())
    return img


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
