"""Run assembly: the recipe and the DeepSpeed config read, checked and settled before any rank
starts (`config`, `ds_config`, `schedules`, `data`), the run's features listed once
(`features`), and the one `build` of a model that training, evaluation and export share."""
