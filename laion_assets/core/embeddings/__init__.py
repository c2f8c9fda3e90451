"""images → embeddings/<space>: open_clip models, the batched encoder (one decode for every tower), embedding columns in Delta."""
