"""Dataset adapters, label tables, synthetic scenes, shards and augmentations."""
