"""The console scripts other than training (`pretrain/train.py`, the launchers' script): evaluate,
export, sample, plot and plan. Each is a thin command line over the library modules."""
