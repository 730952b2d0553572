"""Data pipelines: raw corpora -> WebDataset shards + manifest -> streaming batches."""
