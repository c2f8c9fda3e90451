"""What each column of the lake's tables means, shown with every table schema in the UI.

Columns we compute are described here once; every other column of raw_urls and of the subsets
came from the input file and is described as such (LAION's own columns by name)."""

from __future__ import annotations

COMPUTED = {
    "shard": "partition key: the input file's name without extensions",
    "uid": "LAION's sample id: mmh3.hash64(url + caption)[0], signed 64-bit; joins every table",
    "url": "image URL from the input file (LAION's URL column)",
    "caption": "alt text / caption from the input file (LAION's TEXT column)",
    "source_row": "the row's position in the input file, from 0",
    "fetch_url": "the URL as fetched: `url` parsed and serialised the way browsers do (WHATWG)",
    "reason": "why the input row was kept out (missing_url, unsupported_scheme, malformed_url, duplicate_uid, ...)",
    "detail": "what exactly was wrong with the kept-out row",
    "duplicate_of_row": "for a duplicate (url, caption): the source_row it repeats",
    # images
    "status": "what happened to the row: success or the failure kind (docs/TABLES.md)",
    "error": "why the row failed, one line; null on success",
    "retryable": "true when the failure may pass on a retry (timeouts, 429, 5xx): --retry-failures refetches these",
    "http_status": "HTTP status of the final response (after redirects); null when none came",
    "content_type": "Content-Type header of the final response",
    "attempts": "requests made for this URL, retries included",
    "bytes_downloaded": "size of the downloaded body in bytes",
    "original_width": "width of the downloaded image in pixels, before resizing",
    "original_height": "height of the downloaded image in pixels, before resizing",
    "width": "width of the stored image in pixels",
    "height": "height of the stored image in pixels",
    "sha256": "sha256 of the original downloaded bytes (hex)",
    "md5": "md5 of the original downloaded bytes (hex), for hash blocklists",
    "sha1": "sha1 of the original downloaded bytes (hex), for hash blocklists",
    "phash": "64-bit perceptual hash (pHash, as imagehash computes it) of the decoded image, 16 hex digits",
    "image": "the stored, re-encoded image bytes (images.format); null unless status is success",
    "image_sha256": "sha256 of the stored image bytes, taken when they were encoded: the gate checks every image against it",
    "duration_s": "seconds spent fetching and decoding this row",
    # embeddings and scores
    "image_embedding": "L2-normalised CLIP image embedding (float16: 2*dim-byte binary cell; float32: list)",
    "text_embedding": "L2-normalised CLIP caption embedding, same encoding as image_embedding",
    "similarity": "cosine similarity of image_embedding and text_embedding (CLIP score)",
    "embedding_space": "the CLIP model (model/pretrained) of the embeddings and of similarity; each score's is in the scores asset's `heads` metadata",
    # one per head: each names its own predictor (test_pictures checks it)
    "aesthetic": "aesthetic score of LAION's aesthetic predictor V1 (linear head on CLIP image embeddings, about 1-10): "
                 "LAION-5B's aesthetic, cut at > 7 for LAION-Aesthetics V1; null on shards scored without this head",
    "aesthetic_v2": "aesthetic score of LAION's improved aesthetic predictor V2 (MLP on CLIP ViT-L/14 image embeddings, 1-10): "
                    "cut at >= 4.5 / 5 / 6 / 6.5 for the LAION-Aesthetics V2 subsets; null on shards scored without this head",
    "punsafe": "probability the image is unsafe, from LAION's CLIP-based NSFW detector (on CLIP image embeddings); "
               "null on shards scored without this head",
    "pwatermark": "probability the image carries a watermark, from LAION's watermark classifier on the pixels (model in watermark_model)",
    "recipe_id": "hash of the subset's recipe (thresholds, embedding space, code version)",
    "head_files": "sha256 of the head file that computed each score column (JSON)",
    # language and watermark
    "language": "caption language (ISO code) where CLD3 is reliable, else nolang (LAION's rule)",
    "language_guess": "CLD3's best guess, reliable or not",
    "language_confidence": "CLD3's probability for language_guess",
    "caption_chars": "length of the cleaned caption (LAION drops alt text under 5 characters)",
    "language_detector": "the detector and version that labelled the caption",
    "watermark_model": "the watermark classifier that computed pwatermark",
}

SOURCE = {
    "WIDTH": "image width the source reported",
    "HEIGHT": "image height the source reported",
    "LICENSE": "licence found on the source page",
    "LANGUAGE": "caption language detected by LAION",
    "NSFW": "LAION's NSFW tag (UNLIKELY / UNSURE / NSFW)",
    "similarity": "LAION's own CLIP similarity",
    "punsafe": "LAION's punsafe",
    "pwatermark": "LAION's watermark probability",
    "hash": "LAION's hash of url + caption",
    "key": "sample key in LAION's webdataset shards",
    "status": "status from the source's own download",
    "shard": "the source's own shard column",
    "uid": "the source's own uid column",
}


INGEST = ("shard", "uid", "url", "caption", "source_row", "fetch_url", "reason", "detail", "duplicate_of_row")


def describe(table: str, column: str) -> str:
    """The description shown for `column` of `table` ('' if nobody wrote one)."""
    raw = table in ("raw_urls", "raw_urls_rejected")
    if column in COMPUTED and (column in INGEST or not raw):
        return COMPUTED[column]
    if table == "scores" and column != "shard":
        return f"score of the `{column}` head (file and space in the asset's `heads` metadata); null when unscored"
    if not (raw or table.startswith("subsets/")):
        return ""
    name = column.removeprefix("source_")
    known = SOURCE.get(name) or SOURCE.get(name.upper()) or SOURCE.get(name.lower())
    renamed = " (prefixed source_: we compute a column of that name)" if column.startswith("source_") else ""
    return f"from the input file{renamed}" + (f": {known}" if known else ", kept as-is")
