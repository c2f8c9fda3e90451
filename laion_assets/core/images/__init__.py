"""raw_urls → images: fetching (SSRF guard, politeness, retries), the shard download loop, decode/resize/encode on worker processes."""
