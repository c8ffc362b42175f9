"""The data plane: read -> clean -> split -> shards (prepare), and the per-rank stream (train, evaluate)."""
