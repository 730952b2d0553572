"""What runs on every rank once a run is assembled: the training loop (`trainer`), checkpoints and
resume (`checkpoint`), metrics (`metrics`, `flops`) and the test hooks that watch a run (`hooks`)."""
