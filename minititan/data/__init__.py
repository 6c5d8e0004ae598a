"""Real pre-training data: tokenize a corpus into shards, sample and mix them, read ahead (docs/data.md)."""
