"""FaRL pre-training and fine-tuning on the built LAION-FACE shards."""
