"""Random generators per rank (issue 22 item 7): every rank builds the same weights, then each model
replica draws its own dropout masks; a checkpoint carries each rank's host and accelerator generators,
so a resume draws what the uninterrupted run would have drawn. Real engines in one process; the
2-rank check is in tests/test_objective.py (objective_ranks.py records each rank's draws)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.runtime.checkpoint import load_rank_state
from pretrain.runtime.rng import replica_seed, seed_replica
from tests.launch import REPO
from tests.launch import world_of_one as launch_world_of_one


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    with launch_world_of_one():
        yield


def test_replicas_draw_apart_and_the_same_replica_draws_alike():
    draws = {}
    for replica in (0, 1, 2):
        seed_replica(1234, replica)
        draws[replica] = torch.rand(4)
    assert not torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])
    seed_replica(1234, 1)
    assert torch.equal(torch.rand(4), draws[1])
    # not seed + replica: replica 1 of seed 1 is not replica 0 of seed 2
    assert replica_seed(1, 1) != replica_seed(2, 0)


def _trainer(tmp_path: Path, data: Path, resume: str):
    from pretrain.runtime.trainer import Trainer
    from pretrain.train import build_parser, prepare

    recipe = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())
    recipe["model"]["dropout"] = 0.1
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    argv = ["--config", str(tmp_path / "r.json"), "--data", str(data), "--output-dir", str(tmp_path / "run")]
    args = build_parser().parse_args([*argv, "--deepspeed_config", str(REPO / "ds_configs/zero1_fp32.json")])
    trainer = Trainer(*prepare(args), resume, progress=False)
    trainer.setup()
    return trainer


def test_a_resumed_rank_draws_what_the_uninterrupted_run_drew(prepared_stdlib, tmp_path):
    from deepspeed.accelerator import get_accelerator

    first = _trainer(tmp_path, prepared_stdlib, "none")
    first.train_step(log=False)
    first.save()
    first.ckpt.flush()  # the files are written in the background; flush seals them
    state = load_rank_state(sorted((tmp_path / "run/checkpoints").glob("step_*"))[-1], 0)
    assert "accelerator" in state["rng"], "the accelerator's generator is saved with the host's"
    # what the uninterrupted run draws next, on the host and on the accelerator
    host, device = torch.rand(5), torch.rand(5, generator=None, device=get_accelerator().device_name())
    seed_replica(99, 0)  # anything in between
    resumed = _trainer(tmp_path, prepared_stdlib, "auto")
    assert resumed.state.step == 1
    assert torch.equal(torch.rand(5), host)
    assert torch.equal(torch.rand(5, device=get_accelerator().device_name()), device)
