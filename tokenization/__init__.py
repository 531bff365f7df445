"""Raw text to token shards: readers, byte-level BPE, the Arrow shard schema and the
deterministic memory-mapped dataset. No Ray, no MLflow."""
