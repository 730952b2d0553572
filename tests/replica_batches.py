"""Two ranks of one tensor-parallel group (TP 2, DP 1) train two steps on given windows: the same
on both ranks at step 1, different ones on rank 1 at step 2, as when a node sees other data.

    deepspeed --num_gpus 2 tests/replica_batches.py OUT_PREFIX -- <pretrain/train.py arguments>

Each rank writes OUT_PREFIX.<rank>.json: the steps it trained and the message it stopped with.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # started as a script by a launcher
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from data_pipelines.batch import Batch  # noqa: E402
from tests.objective_ranks import Fixed, windows  # noqa: E402


def main() -> int:
    import deepspeed
    import torch.distributed as dist

    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    prefix, argv = args[0], args[args.index("--") + 1 :]
    from pretrain.runtime.trainer import Trainer, TrainingStopped
    from pretrain.train import build_parser, prepare

    resolved, inputs, run_dir = prepare(build_parser().parse_args([*argv, "--no-progress"]))
    deepspeed.init_distributed()
    trainer = Trainer(resolved, inputs, run_dir, "none", progress=False)
    trainer.setup()
    rank = dist.get_rank()
    rows = windows(inputs.data.seq_len, None)
    same = Batch({k: v[:1] for k, v in rows.items()})
    other = Batch({k: v[1:] if rank == 1 else v[:1] for k, v in rows.items()})
    trainer.stream = Fixed([same, other])
    trainer.stream.samples_by_source = lambda: {"fixed-windows": 2}
    trained, message = [], None
    try:
        for _ in range(2):
            trainer.train_step(log=False)
            trained.append(trainer.state.step)
    except TrainingStopped as e:
        message = str(e)
    Path(f"{prefix}.{rank}.json").write_text(json.dumps({"trained": trained, "message": message}))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
