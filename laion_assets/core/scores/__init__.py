"""embeddings → scores, and the other per-row tags: LAION's heads, the watermark classifier (pixels), caption language."""
