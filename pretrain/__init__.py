"""DeepSpeed pretraining of Hugging Face models: recipes, trainer, evaluation and export."""
