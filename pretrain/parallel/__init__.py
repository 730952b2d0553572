"""The parallel layout: which rank holds which part of the model and the batch (`layout`), and
the features that lay a model out across ranks or memory (`tensor_parallel`, `sequence_parallel`,
activation checkpointing in `parallelize`)."""
