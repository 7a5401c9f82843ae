"""Training data: shards in, batches out (reader, its stages, the stream, augmentation, scenes, shard writers)."""
