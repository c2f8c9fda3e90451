"""Lake-wide curation between the shard stages and the subsets: exact and perceptual dedup, hash blocklists, SemDeDup."""
