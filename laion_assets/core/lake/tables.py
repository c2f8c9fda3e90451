"""The name of every table the stages share, low in the tree so that any layer can name a
table without importing the stage that writes it."""

RAW_URLS, IMAGES, SCORES = "raw_urls", "images", "scores"
LANGUAGE, WATERMARK = "language", "watermark"
STAGING_IMAGES = "_staging/images"


def embeddings_table(space: str) -> str:
    """One table per configured embedding space, e.g. `embeddings/b32`."""
    return f"embeddings/{space}"


def staging_embeddings(space: str) -> str:
    return f"_staging/embeddings/{space}"


def subset_table(name: str) -> str:
    return f"subsets/{name}"


# the lake-wide curation tables
BLOCKED, DUPLICATES = "curation/blocked", "curation/duplicates"
DEDUP_KEYS = "curation/dedup_keys"  # the per-shard key index, partitioned by bucket
