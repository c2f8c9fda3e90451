"""Input shard files → raw_urls: reading every input format, URLs the WHATWG way, LAION uids, the shard registry, the bundled sample."""
