"""prepare-text: a text corpus -> tokenized, packed WebDataset shards with a manifest."""
