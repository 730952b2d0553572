"""`pretrain/train.py` that also reports how the model was loaded, for the ZeRO-3 --init-from test.

    deepspeed --num_gpus 2 tests/zero3_load_probe.py REPORT_DIR -- <pretrain/train.py arguments>

Right after the family builds the model (before any adapter, before deepspeed.initialize), each
rank writes REPORT_DIR/rank<r>.json: whether every parameter was already a ZeRO-3 partition, the
elements it holds locally against the whole model's, and (gathered) whether every weight equals the
init_from checkpoint's. Then the run goes on as `pretrain/train.py` would.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # started as a script by a launcher
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import torch  # noqa: E402

import pretrain.runtime.trainer  # noqa: E402


def _report(model: torch.nn.Module, init_from: str, out: Path) -> None:
    import deepspeed
    import torch.distributed as dist
    from safetensors.torch import load_file

    params = list(model.named_parameters())
    partitioned = all(hasattr(p, "ds_id") for _, p in params)
    local = sum(p.ds_tensor.numel() for _, p in params if hasattr(p, "ds_tensor"))
    whole = sum(getattr(p, "ds_numel", p.numel()) for _, p in params)
    saved = load_file(str(Path(init_from) / "model.safetensors"))
    differ, missing = [], []
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        for name, p in params:
            if name not in saved:
                missing.append(name)  # tied weights the file stores once
            elif not torch.equal(p.detach().cpu(), saved[name]):
                differ.append(name)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.get_rank()}.json").write_text(
        json.dumps(
            {
                "partitioned": partitioned,
                "local_numel": local,
                "ds_numel": whole,
                "differ": differ,
                "missing": missing,
                "world": dist.get_world_size(),
            }
        )
    )


class ProbeTrainer(pretrain.runtime.trainer.Trainer):
    report_dir: Path

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        build = self.family.build_model

        def build_and_report(model_cfg, config):
            model = build(model_cfg, config)
            _report(self.family.hf_model(model), model_cfg.init_from, self.report_dir)
            return model

        self.family = dataclasses.replace(self.family, build_model=build_and_report)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--")
    # the deepspeed launcher puts --local_rank=N first; train.py reads LOCAL_RANK from the environment
    ProbeTrainer.report_dir = Path(next(a for a in argv[:split] if not a.startswith("--local")))
    pretrain.runtime.trainer.Trainer = ProbeTrainer  # pretrain.train.main looks the class up when it runs
    from pretrain.train import main as train_main

    return train_main(argv[split + 1 :])


if __name__ == "__main__":
    sys.exit(main())
