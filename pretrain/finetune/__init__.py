"""Fine-tuning a trained or exported model: LoRA adapters (`adapters`), CLIP on a labelled image
folder (`classify`) and weight-space ensembling of the fine-tuned and zero-shot weights (`wise_ft`)."""
