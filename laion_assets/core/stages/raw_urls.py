"""raw_urls: one input shard file read, normalised, given LAION uids, audited and published."""

from __future__ import annotations

import logging

from laion_assets.core import quality, registry
from laion_assets.core.config import PipelineConfig
from laion_assets.core.ingest import normalize, read_shard_file
from laion_assets.core.lake import Lake
from laion_assets.core.stages.publish import RAW_URLS, StageOutput, gate, publish

log = logging.getLogger(__name__)


def run_raw_urls(lake: Lake, cfg: PipelineConfig, shard: str) -> StageOutput:
    source = registry.source_of(lake, shard)
    res = normalize(read_shard_file(source), source)
    kept = res.rows.height
    report = gate(RAW_URLS, shard, res.rows.select("uid", "url"), quality.raw_urls_suite(res.input_rows - sum(res.rejected.values())))
    stats = {"source": source, "input_rows": res.input_rows, "rows": kept, "rejected": res.rejected, "renamed_columns": res.renamed}
    for reason, n in res.rejected.items():
        log.warning("shard %s: %d rows kept out: %s", shard, n, reason)
    return publish(lake, RAW_URLS, shard, res.rows, report, stats, {"source": source})
