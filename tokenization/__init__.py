"""Raw text to token shards: input resolution, readers, byte-level BPE, the Arrow shard schema and the
deterministic memory-mapped dataset. No Ray, no MLflow."""
