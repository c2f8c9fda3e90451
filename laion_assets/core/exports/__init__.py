"""subsets → what consumers read: webdataset tars, kNN indexes, search (CLI and page)."""
