"""What the UI shows of a published shard, read back from the lake: thumbnails from the stored
image bytes (never the source URLs, which die with their servers), failures by kind, and
histograms of every score column with the subset thresholds drawn in.

Each *_view returns {label: markdown}; pictures are rendered by `pictures`. Each tile of a grid
shows first the values its grid is sorted or filtered by, under their column names.
"""

from __future__ import annotations

import polars as pl

from laion_assets.core.config import PipelineConfig
from laion_assets.core.lake.delta import Lake
from laion_assets.core.subsets.rules import SubsetConfig
from laion_assets.core.ui import pictures

THRESHOLD_OPS = {"at_least": ">=", "above": ">", "below": "<"}  # SubsetConfig's threshold groups
FLOOR_COLUMNS = {"min_width": "original_width", "min_height": "original_height", "min_image_bytes": "bytes_downloaded"}
SIZE_COLUMNS = ("original_width", "original_height")


def subset_thresholds(cfg: PipelineConfig, subsets: list[SubsetConfig] | None = None) -> dict[str, list[tuple[str, float]]]:
    """column -> [(label, value)] from every subset's rule: its similarity threshold (on the
    similarity of its space, `similarity/<space>`), its thresholds on any column (at_least,
    above, below) and its size floors; a threshold on a new column appears by itself."""
    out: dict[str, list[tuple[str, float]]] = {}

    def add(column: str, name: str, op: str, value: float) -> None:
        out.setdefault(column, []).append((f"{name} {op} {value:g}", float(value)))

    for sub in cfg.subsets if subsets is None else subsets:
        if sub.min_similarity is not None:
            add(f"similarity/{cfg.similarity_space(sub)}", sub.name, ">=", sub.min_similarity)
        for group, op in THRESHOLD_OPS.items():
            for column, value in getattr(sub, group).items():
                add(column, sub.name, op, value)
        for field, column in FLOOR_COLUMNS.items():
            if getattr(sub, field) is not None:
                add(column, sub.name, ">=", getattr(sub, field))
    return out


def _thresholds_for(column: str, thresholds: dict) -> tuple:
    return tuple(thresholds.get(column, ()))


def _panels(frame: pl.DataFrame, thresholds: dict, kept: pl.Series | None = None) -> list[pictures.Panel]:
    """One histogram per numeric column with values (uid aside)."""
    panels = []
    for column, dtype in frame.schema.items():
        if column == "uid" or not dtype.is_numeric():
            continue
        values = frame[column].drop_nulls()
        if not values.len():
            continue
        highlight = None
        if kept is not None:
            highlight = frame.filter(pl.col("uid").is_in(kept.implode()))[column].drop_nulls().to_numpy()
        panels.append(pictures.Panel(column, values.to_numpy(), highlight, _thresholds_for(column, thresholds)))
    return panels


def _facts(row: dict, columns: list[str]) -> tuple[str, ...]:
    """The row's values of `columns` in that order, each under its column name: numbers to 3
    digits ("aesthetic 5.42"), the rest as they are ("language en")."""
    return tuple(
        f"{c} {row[c]:.3g}" if isinstance(row[c], float) else f"{c} {row[c]}" for c in columns if row.get(c) is not None
    )


def _tiles(lake: Lake, cfg: PipelineConfig, shard: str, rows: pl.DataFrame, facts: list[str]) -> list[pictures.Tile]:
    """Tiles of the first `ui.thumbnails` rows (uid, caption, facts), with their stored bytes
    read from the images table."""
    rows = rows.head(cfg.ui.thumbnails)
    if not rows.height:
        return []
    stored = {}
    for batch in lake.batches("images", shard, ["uid", "image"], uids=rows["uid"].to_list()):
        stored.update(zip(batch["uid"].to_pylist(), batch["image"].to_pylist()))
        if len(stored) == rows.height:  # the rest of the shard's bytes need not be read
            break
    return [
        pictures.Tile(stored[r["uid"]], r.get("caption") or "", _facts(r, facts))
        for r in rows.iter_rows(named=True) if stored.get(r["uid"])
    ]


def _grid(alt: str, tiles: list[pictures.Tile]) -> dict[str, str]:
    return {"thumbnails": pictures.markdown_image(alt, pictures.thumbnail_grid(tiles))} if tiles else {}


def _chart(cfg: PipelineConfig, key: str, panels: list[pictures.Panel], title: str) -> dict[str, str]:
    if not (cfg.ui.histograms and panels):
        return {}
    return {key: pictures.markdown_image(title, pictures.histograms(panels, title=title))}


def _spread(df: pl.DataFrame, column: str, n: int) -> pl.DataFrame:
    """n rows spread evenly over `column`'s range (lowest to highest), to see what scores mean."""
    df = df.filter(pl.col(column).is_not_null()).sort(column)
    if df.height <= n:
        return df
    return df[[round(i * (df.height - 1) / (n - 1)) for i in range(n)]]


def images_view(lake: Lake, cfg: PipelineConfig, shard: str) -> dict[str, str]:
    """Stored thumbnails with captions and sizes, failures by kind with examples, size histogram."""
    meta = lake.read_shard("images", shard, ["uid", "url", "status", "error", "http_status", *SIZE_COLUMNS])
    ok = meta.filter(pl.col("status") == "success")
    sample = (
        ok.head(cfg.ui.thumbnails)
        .join(lake.read_shard("raw_urls", shard, ["uid", "caption"]), on="uid", how="left", maintain_order="left")
        .with_columns(size=pl.format("{}x{}", *SIZE_COLUMNS))
    )
    out = _grid(f"stored images of shard {shard}", _tiles(lake, cfg, shard, sample, ["size"]))
    out["failures"] = failures_markdown(meta)
    thresholds = subset_thresholds(cfg)
    if cfg.images.min_image_size:
        for c in SIZE_COLUMNS:
            thresholds.setdefault(c, []).append((f"min_image_size {cfg.images.min_image_size}", cfg.images.min_image_size))
    out.update(_chart(cfg, "image_sizes", _panels(ok.select("uid", *SIZE_COLUMNS), thresholds), "original sizes of the stored images (px)"))
    return out


def failures_markdown(meta: pl.DataFrame, examples: int = 2) -> str:
    """Failures by kind: rows, share, and example errors with their URL (as text: not a link)."""
    failed = meta.filter(pl.col("status") != "success")
    if not failed.height:
        return "no failures"
    kinds = (
        failed.group_by("status")
        .agg(rows=pl.len(), errors=pl.struct("error", "http_status", "url").head(examples))
        .sort("rows", "status", descending=[True, False])
    )
    lines = ["| status | rows | share | example error | example url |", "|---|---|---|---|---|"]
    for kind in kinds.iter_rows(named=True):
        share = f"{kind['rows'] / meta.height:.1%}"
        for i, e in enumerate(kind["errors"]):
            error = (e["error"] or (f"HTTP {e['http_status']}" if e["http_status"] else ""))[:80].replace("|", "\\|")
            head = f"| {kind['status']} | {kind['rows']} | {share} " if i == 0 else "| | | "
            lines.append(f"{head}| {error} | `{(e['url'] or '')[:100]}` |")
    return "\n".join(lines)


def score_frame(lake: Lake, shard: str) -> pl.DataFrame:
    """uid and every score of a shard's stored images: the similarity in each embedding space,
    each head's score, our pwatermark, and the source's pwatermark when the input had one."""
    frame = lake.read_shard("images", shard, ["uid", "status"]).filter(pl.col("status") == "success").drop("status")
    for table in lake.tables():
        if table.startswith("embeddings/"):  # similarity/<space>, one per space
            sims = lake.read_shard(table, shard, ["uid", "similarity"]).rename({"similarity": f"similarity/{table[11:]}"})
            frame = frame.join(sims, on="uid", how="left")
    for table in ("scores", "watermark"):  # one column per head; pwatermark
        if lake.exists(table):
            scores = lake.read_shard(table, shard).drop("shard")
            numeric = [c for c, t in scores.schema.items() if c != "uid" and t.is_numeric()]
            frame = frame.join(scores.select("uid", *numeric), on="uid", how="left")
    raw_columns = lake.table("raw_urls").schema().to_arrow().names
    if "pwatermark" in raw_columns:
        source = lake.read_shard("raw_urls", shard, ["uid", "pwatermark"]).rename({"pwatermark": "source_pwatermark"})
        frame = frame.join(source.with_columns(pl.col("source_pwatermark").cast(pl.Float64, strict=False)), on="uid", how="left")
    return frame


def embeddings_view(lake: Lake, cfg: PipelineConfig, shard: str, space: str) -> dict[str, str]:
    """Histogram of the image-caption similarity in `space`, with the thresholds of the subsets
    that filter on it."""
    sims = lake.read_shard(f"embeddings/{space}", shard, ["uid", "similarity"]).rename({"similarity": f"similarity/{space}"})
    return _chart(cfg, "similarity_histogram", _panels(sims, subset_thresholds(cfg)), f"shard {shard}: image-caption similarity ({space})")


def scores_view(lake: Lake, cfg: PipelineConfig, shard: str) -> dict[str, str]:
    """Histograms of every score with every subset's thresholds; thumbnails from the lowest to
    the highest aesthetic score, each showing it first."""
    frame = score_frame(lake, shard)
    out = _chart(cfg, "score_histograms", _panels(frame, subset_thresholds(cfg)), f"shard {shard}: scores and subset thresholds")
    out.update(_grid(*score_tiles(lake, cfg, shard, frame)))
    return out


def score_tiles(lake: Lake, cfg: PipelineConfig, shard: str, frame: pl.DataFrame) -> tuple[str, list[pictures.Tile]]:
    """(alt text, tiles) of the scores grid: images spread from the lowest to the highest
    aesthetic score (or the first score there is), each showing that score first, then the
    others that fit."""
    scored = [c for c in frame.columns if c != "uid" and frame[c].null_count() < frame.height]
    if not scored:
        return "", []
    order = "aesthetic" if "aesthetic" in scored else scored[0]
    rows = _spread(frame, order, cfg.ui.thumbnails).join(
        lake.read_shard("raw_urls", shard, ["uid", "caption"]), on="uid", how="left", maintain_order="left"
    )
    facts = [order, *(c for c in scored if c != order)]
    return f"shard {shard} from lowest to highest {order}", _tiles(lake, cfg, shard, rows, facts)


def _rule_columns(cfg: PipelineConfig, sub: SubsetConfig) -> dict[str, str]:
    """The subset table's columns that `sub` filters on -> their names in the UI: its
    thresholds' columns (our similarity is `similarity/<space>`, as in the histograms) and the
    caption language when it picks languages."""
    columns = {"similarity" if c.startswith("similarity/") else c: c for c in subset_thresholds(cfg, [sub])}
    return columns | ({"language": "language"} if sub.uses_language else {})


def subset_view(lake: Lake, cfg: PipelineConfig, sub: SubsetConfig, shard: str, table: str) -> dict[str, str]:
    """The shard's scores and sizes with the rows this subset keeps highlighted and its
    thresholds drawn; thumbnails of kept rows with the values its rule filters on."""
    kept = lake.read_shard(table, shard, ["uid"])["uid"]
    frame = score_frame(lake, shard)
    pool = frame.join(lake.read_shard("images", shard, ["uid", *SIZE_COLUMNS]), on="uid", how="left")
    panels = _panels(pool, subset_thresholds(cfg, [sub]), kept)
    out = _chart(cfg, "kept_histograms", [p for p in panels if p.thresholds] or panels, f"{sub.name}: {kept.len()} of {frame.height} images kept")
    out.update(_grid(*subset_tiles(lake, cfg, sub, shard, table, frame)))
    return out


def subset_tiles(lake: Lake, cfg: PipelineConfig, sub: SubsetConfig, shard: str, table: str, frame: pl.DataFrame) -> tuple[str, list[pictures.Tile]]:
    """(alt text, tiles) of a subset's grid: kept rows, each showing the values the rule
    filtered on, read from the subset table (what the rule saw); a rule with no threshold shows
    the shard's scores instead."""
    rule = _rule_columns(cfg, sub)
    rows = lake.read_shard(table, shard, ["uid", "caption", *rule]).head(cfg.ui.thumbnails).rename(rule)
    facts = list(rule.values())
    if not facts:
        rows = rows.join(frame, on="uid", how="left", maintain_order="left")
        facts = [c for c in frame.columns if c != "uid"]
    return f"rows of {sub.name} in shard {shard}", _tiles(lake, cfg, shard, rows, facts)
