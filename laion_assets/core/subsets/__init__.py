"""Every per-shard table → subsets/<name>: typed rules, LAION's published presets, the predicates that apply them."""
