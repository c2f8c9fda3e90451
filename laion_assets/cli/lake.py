"""`check-store`, `migrate-embeddings`, `adopt`, `adopt-images`, `adopt-embeddings`, `maintain`,
`remove-shard`: looking after a lake, and bringing in what a lab already holds."""

from __future__ import annotations

from laion_assets.cli.options import add_config, add_lake
from laion_assets.cli.pipeline import dagster_instance


def cmd_check_store(args) -> int:
    """Probe the lake's object store for the conditional writes Delta commits rely on."""
    from laion_assets.core.lake.delta import Lake
    from laion_assets.core.lake.store import check_conditional_writes

    print(check_conditional_writes(Lake(args.lake)))
    return 0


def cmd_migrate_embeddings(args) -> int:
    from laion_assets.core import stages
    from laion_assets.core.config import load_config
    from laion_assets.core.lake.delta import Lake
    from laion_assets.core.lake.errors import LaionAssetsError
    from laion_assets.core.lake.migrate import migrate_embeddings
    from laion_assets.core.stages import fingerprints

    cfg = load_config(args.config)
    spaces = cfg.embeddings.spaces
    if args.space not in spaces:
        raise LaionAssetsError(f"space '{args.space}' is not in embeddings.spaces of the config ({', '.join(spaces)})")
    lake = Lake(args.lake)
    result = migrate_embeddings(lake, args.space, spaces[args.space].identity, force=args.force)
    print(f"moved the embeddings table to {result['table']} ({result['rows']} rows)" if result["moved"] else result["reason"])
    if result["moved"]:  # moved, not made: recorded as up to date, so `run` does not embed them again
        fingerprints.adopt(lake, cfg, stages.embeddings_table(args.space))
    return 0


def cmd_remove_shard(args) -> int:
    """Delete shards from every table of the lake, the registry and the Dagster partitions."""
    from laion_assets.core.ingest import registry
    from laion_assets.core.lake.delta import Lake
    from laion_assets.defs.partitions import shards

    lk = Lake(args.lake)
    instance = dagster_instance()
    for key in args.shards:
        deleted = registry.remove_shard(lk, key)
        instance.delete_dynamic_partition(shards.name, key)
        rows = ", ".join(f"{name} {n}" for name, n in deleted.items()) or "no rows"
        print(f"shard {key} removed (rows per table, files per export folder): {rows}; partition deleted")
    return 0


def cmd_adopt(args) -> int:
    """Record a lake's published shards as made from the current config and code."""
    from laion_assets.core.config import load_config
    from laion_assets.core.lake.delta import Lake
    from laion_assets.core.stages import fingerprints

    cfg, lake = load_config(args.config), Lake(args.lake)
    tables = [t for t in lake.tables() if not t.startswith("_") and fingerprints.stage_of(t) in fingerprints.CODE_VERSIONS]
    for table in tables:
        print(f"  {table:<28} {fingerprints.adopt(lake, cfg, table):>6} shards recorded as up to date")
    return 0


def cmd_adopt_images(args) -> int:
    """An img2dataset download as the lake's shards: raw_urls and images read from its folder
    through Dagster (runs the UI shows), no request made; --select adds later stages."""
    from laion_assets.cli.pipeline import report_run, run_pipeline

    return report_run(args.lake, lambda summary: run_pipeline(
        [], args.lake, args.config, args.select, force=args.force, summary=summary, adopt=(args.folder, args.prefix),
    ))


def cmd_adopt_embeddings(args) -> int:
    """Check a parquet_npy folder whole (nothing is registered if a part is refused), then
    ingest its metadata files as shards and publish their vectors, through Dagster."""
    from laion_assets.cli.pipeline import report_run, run_pipeline
    from laion_assets.core.config import load_config
    from laion_assets.core.embeddings.published import METADATA, find_parts
    from laion_assets.core.stages.adopt import adopted_space, check_part

    cfg = load_config(args.config)
    identity, dim = adopted_space(cfg, args.space)
    parts = find_parts(args.location)
    rows = sum(check_part(p, args.space, dim, cfg.quality.embedding_norm_tolerance) for p in parts)
    texts = sum(p.text is not None for p in parts)
    print(f"{len(parts)} parts checked: {rows} rows of {dim}-d {identity} vectors, text embeddings in {texts} of them", flush=True)
    return report_run(args.lake, lambda summary: run_pipeline(
        [f"{args.location.rstrip('/')}/{METADATA}"], args.lake, args.config, f"raw_urls,embeddings/{args.space}", summary=summary,
    ))


def cmd_maintain(args) -> int:
    """The lake_maintenance job, through Dagster (recorded in the instance like the schedule's)."""
    from laion_assets.defs.definitions import build_defs
    from laion_assets.defs.resources import Settings

    defs = build_defs(Settings(lake=args.lake, config=args.config))
    result = defs.resolve_job_def("lake_maintenance").execute_in_process(instance=dagster_instance(), raise_on_error=False)
    print("lake maintained: staging leftovers removed, tables compacted and vacuumed" if result.success else "maintenance failed (see the run's logs)")
    return 0 if result.success else 1


def add_commands(sub, env_lake: str, env_config: str | None) -> None:
    store = sub.add_parser(
        "check-store", help="check that the lake's object store is safe for concurrent writers",
        description="Probe the lake's object store for the conditional writes (If-None-Match: *) Delta commits rely "
        "on: on a store that ignores them, two writers of one table version overwrite each other's commit. Local "
        "folders need no probe.",
    )
    add_lake(store, env_lake)
    store.set_defaults(fn=cmd_check_store)

    migrate = sub.add_parser(
        "migrate-embeddings", help="move a lake's single `embeddings` table to embeddings/<space> (no recompute)",
        description="A lake from before embedding spaces has one `embeddings` table: move it to embeddings/SPACE and "
        "record it as up to date, so `run` does not embed again. Refused when its vectors come from another model "
        "than the space's (unless --force); an interrupted move is finished by running it again.",
    )
    migrate.add_argument("--space", required=True, help="the configured space those vectors belong to, e.g. b32")
    add_lake(migrate, env_lake)
    add_config(migrate, env_config, note=" declaring the space")
    migrate.add_argument("--force", action="store_true", help="move even if the vectors' model differs from the space's")
    migrate.set_defaults(fn=cmd_migrate_embeddings)

    adopt = sub.add_parser(
        "adopt", help="record the published shards as made from the current config (a lake from before fingerprints)",
        description="A lake from before fingerprints: record every published shard of every stage as made from the "
        "current config and code, so `run` treats it as up to date. Nothing is recomputed.",
    )
    add_lake(adopt, env_lake)
    add_config(adopt, env_config, note=" the shards count as made from")
    adopt.set_defaults(fn=cmd_adopt)

    images = sub.add_parser(
        "adopt-images", help="take an img2dataset download in as the lake's shards, without a request",
        description="Register each finished shard of an img2dataset output folder (files, webdataset or parquet "
        "output format; local or s3://) as the lake's shard PREFIX-NNNNN and publish its raw_urls and images from "
        "the folder: img2dataset's statuses mapped to the lake's (its text kept in `error` and in raw_urls' "
        "img2dataset_* columns), every input column kept, each stored image checked to decode and kept as stored. "
        "No URL is fetched, now or by a later run: later stages (--select) run on the shards like on downloaded ones.",
    )
    images.add_argument("folder", help="img2dataset's output_folder (NNNNN.parquet + NNNNN_stats.json per shard)")
    images.add_argument("--prefix", help="shard keys are PREFIX-NNNNN (default: the folder's name; '' for NNNNN)")
    images.add_argument("--select", default="raw_urls,images", help="assets to run per shard (default %(default)s; "
                        "same syntax as `run --select`, e.g. raw_urls,images,embeddings,scores,subsets)")
    images.add_argument("--force", action="store_true", help="adopt again shards already up to date")
    add_lake(images, env_lake)
    add_config(images, env_config)
    images.set_defaults(fn=cmd_adopt_images)

    embeddings = sub.add_parser(
        "adopt-embeddings", help="ingest published embeddings and metadata (LAION's parquet_npy layout) without images",
        description="Read a folder in LAION's published-embeddings layout (metadata/metadata_NNNN.parquet, "
        "img_emb/img_emb_NNNN.npy, optional text_emb/text_emb_NNNN.npy; local or s3://): each metadata file becomes a "
        "shard, its rows raw_urls (LAION's uids) and its vectors embeddings/SPACE, a space declared with adopted: true. "
        "Every part is checked first (row counts, dimension, NaN, unit norm): nothing is registered if one is refused.",
    )
    embeddings.add_argument("location", help="the folder holding metadata/, img_emb/ (and text_emb/)")
    embeddings.add_argument("--space", required=True, help="the configured adopted space the vectors belong to, e.g. l14")
    add_lake(embeddings, env_lake)
    add_config(embeddings, env_config, note=" declaring the space")
    embeddings.set_defaults(fn=cmd_adopt_embeddings)

    maintain = sub.add_parser(
        "maintain", help="remove leftover staging, compact and vacuum every table (the nightly job)",
        description="Run the lake_maintenance job through Dagster (recorded in the instance like the schedule's "
        "runs): remove staging a killed run left, compact small files and vacuum old ones, honouring "
        "maintenance.vacuum_retention_hours.",
    )
    add_lake(maintain, env_lake)
    add_config(maintain, env_config, note=" (maintenance: retention, file size)")
    maintain.set_defaults(fn=cmd_maintain)

    remove = sub.add_parser(
        "remove-shard", help="delete shards from the lake, the registry and the UI's partitions",
        description="Delete shards from every table of the lake, their export files, the shard registry and the "
        "Dagster partitions. The data goes first, so an interrupted removal is finished by running it again.",
    )
    remove.add_argument("shards", nargs="+", help="shard keys (input file names without extensions)")
    add_lake(remove, env_lake)
    remove.set_defaults(fn=cmd_remove_shard)
