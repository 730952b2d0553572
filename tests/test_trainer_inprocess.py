"""The trainer's seams tested in one process (a gloo world of one, real DeepSpeed engines): the
checkpoint manager, the skip/stop rules, exact resume and a resume in another data layout. What
needs several ranks stays in the multi-rank subprocess tests."""

import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from pretrain.models import get_family
from pretrain.runtime.checkpoint import CheckpointManager, complete_tags, resumable
from pretrain.runtime.trainer import Trainer, TrainingStopped, bad_data_verdict, count_skip
from tests.faults import FaultPlan
from tests.launch import REPO, inprocess_trainer, metrics, prepare_small_corpus
from tests.launch import world_of_one as launch_world_of_one


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    with launch_world_of_one():
        yield


def _trainer(argv: list[str], hooks=None) -> Trainer:
    return inprocess_trainer(argv, hooks)


def _recipe(tmp_path: Path, **training) -> str:
    r = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())
    data = training.pop("data", {})
    r["training"].update(training)
    r["data"].update(data)
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.json"
    path.write_text(json.dumps(r))
    return str(path)


# ------------------------------------------------------------------------------------ pure rules


def test_bad_data_is_judged_after_100_samples_against_max_bad_fraction():
    assert bad_data_verdict(read=50, bad=40, limit=0.01, first_bad="x") is None, "too early to judge"
    assert bad_data_verdict(read=990, bad=10, limit=0.01, first_bad="x") is None, "exactly at the limit"
    msg = bad_data_verdict(read=989, bad=11, limit=0.01, first_bad="bad_shard=1")
    assert "11 of 1000" in msg and "data.max_bad_fraction=0.01" in msg and "bad_shard=1" in msg


def test_fp16_loss_scale_overflows_are_counted_apart_and_never_stop_a_run():
    """A dynamic loss scale that overflowed refuses the update with finite losses: counted as an
    overflow, not as a non-finite skip against training.max_nonfinite_skips (issue 22 item 7)."""
    from pretrain.runtime.state import RunState, refused_step

    assert refused_step("fp16", refused=True, nonfinite_losses=0, norm_finite=False) == "overflow"
    assert refused_step("fp16", refused=True, nonfinite_losses=0, norm_finite=None) == "overflow"
    # a non-finite loss is the data's or the model's, at any precision
    assert refused_step("fp16", refused=True, nonfinite_losses=1, norm_finite=None) == "nonfinite"
    # bf16 / fp32 have no loss scale: a refused step is a non-finite gradient
    assert refused_step("bf16", refused=True, nonfinite_losses=0, norm_finite=False) == "nonfinite"
    assert refused_step("fp32", refused=False, nonfinite_losses=0, norm_finite=False) == "nonfinite"
    assert refused_step("fp16", refused=False, nonfinite_losses=0, norm_finite=True) is None
    state = RunState.from_dict({**RunState(step=3, loss_scale_overflows=7).to_dict()})
    assert state.loss_scale_overflows == 7, "saved with every checkpoint"


def test_replicas_whose_ranks_hold_different_batches_are_found():
    from pretrain.runtime.accumulate import batch_digest, diverged_replicas

    a = {"input_ids": torch.arange(8).reshape(2, 4), "labels": torch.arange(8).reshape(2, 4)}
    b = {"input_ids": torch.arange(8).reshape(2, 4), "labels": torch.arange(1, 9).reshape(2, 4)}
    assert batch_digest([a]) == batch_digest([{k: v.clone() for k, v in a.items()}])
    assert batch_digest([a]) != batch_digest([b]) and batch_digest([a, b]) != batch_digest([b, a])
    assert batch_digest([{"x": torch.zeros(2, 3)}]) != batch_digest([{"x": torch.zeros(3, 2)}])
    # ranks 0-1 are replica 0, ranks 2-3 replica 1 (TP 2 x DP 2)
    assert diverged_replicas([(0, 0, 5), (1, 0, 5), (2, 1, 7), (3, 1, 7)]) == {}
    assert diverged_replicas([(0, 0, 5), (1, 0, 5), (2, 1, 7), (3, 1, 8)]) == {1: {7: [2], 8: [3]}}


def test_non_finite_skips_count_up_to_the_cap_or_stop_at_once():
    assert count_skip(0, "skip", 2, "at step 3") == 1
    assert count_skip(1, "skip", 2, "at step 4") == 2
    with pytest.raises(TrainingStopped, match="3 skipped so far, more than training.max_nonfinite_skips=2"):
        count_skip(2, "skip", 2, "at step 5")
    with pytest.raises(TrainingStopped, match="at step 3; training.on_nonfinite is 'stop'"):
        count_skip(0, "stop", 10, "at step 3")


# ------------------------------------------------------------------------------ checkpoint manager


def _engine(seed: int):
    import deepspeed

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=opt,
        config={
            "train_batch_size": 4,
            "train_micro_batch_size_per_gpu": 4,
            "zero_optimization": {"stage": 2},
            "steps_per_print": 10**9,
        },
    )
    return engine


def _train_one_step(engine, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    loss = engine(torch.randn(4, 8, generator=g)).pow(2).mean()
    engine.backward(loss)
    engine.step()


def test_checkpoint_manager_saves_seals_prunes_finds_and_loads(tmp_path):
    root = tmp_path / "checkpoints"
    hooked = []
    manager = CheckpointManager(
        root,
        rank=0,
        world=1,
        zero_stage=2,
        seed=1,
        keep_last=2,
        in_save=lambda step, rank, tag: hooked.append((step, (tag / "toolkit.json").exists())),
    )
    assert manager.target is None, "nothing to resume yet"
    engine = _engine(0)
    for step in (1, 2, 3):
        _train_one_step(engine, step)
        manager.save(engine, step, {"step": step, "samples": 4 * step}, {"micro_batches": step, "where": f"s{step}"})
    assert hooked == [(1, False), (2, False), (3, False)], "in_save runs before the seal"
    assert [p.name for p in complete_tags(root)] == ["step_00000002", "step_00000003"], "keep_last=2 pruned step 1"
    seal = json.loads((root / "step_00000003" / "toolkit.json").read_text())
    assert seal["step"] == 3 and seal["world_size"] == 1 and seal["where"] == "s3"
    weights = {k: v.clone() for k, v in engine.module.state_dict().items()}
    next_draw = torch.rand(3)  # what this rank's generator gives right after the save

    # A tag written but never sealed (a crash inside the save) is not a resume target.
    (root / "step_00000004").mkdir()
    (root / "latest").write_text("step_00000004")
    assert resumable(root) == root / "step_00000003"

    torch.manual_seed(123)
    other = _engine(1)
    assert any(not torch.equal(v, other.module.state_dict()[k]) for k, v in weights.items())
    resumed = CheckpointManager(root, rank=0, world=1, zero_stage=2, seed=1)
    assert resumed.deepspeed_config({"a": 1}) == {"a": 1}, "same world size: the config as it is"
    restored = resumed.load(other)
    assert restored.tag.name == "step_00000003" and restored.old_world == 1
    assert restored.run_state["samples"] == 12 and restored.data_state == {"micro_batches": 3, "where": "s3"}
    for k, v in weights.items():
        assert torch.equal(other.module.state_dict()[k], v), k
    assert torch.equal(torch.rand(3), next_draw), "the RNG continues where the saved run was"


def test_resume_asks_for_a_complete_checkpoint(tmp_path):
    from pretrain.runtime.checkpoint import CheckpointError

    (tmp_path / "step_00000005").mkdir()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        CheckpointManager(tmp_path, rank=0, world=1, zero_stage=0, seed=0, resume=str(tmp_path / "step_00000005"))


# ------------------------------------------------------------------------------------ the trainer


def test_a_nan_loss_is_skipped_and_a_resumed_trainer_repeats_the_uninterrupted_one(prepared_stdlib, tmp_path):
    common = ["--config", "gpt-tiny", "--data", str(prepared_stdlib), "--eval-every", "3", "--checkpoint-every", "3"]
    ref = _trainer([*common, "--output-dir", str(tmp_path / "ref"), "--max-steps", "6"], FaultPlan(nan_loss_at=[2]))
    ref.fit()
    assert ref.state.nonfinite_skips == 1 and ref.state.step == 6
    assert ref.stream.micro_batches == 7, "six steps and the dropped micro-batch"

    cut = _trainer([*common, "--output-dir", str(tmp_path / "cut"), "--max-steps", "3"], FaultPlan(nan_loss_at=[2]))
    cut.fit()
    resumed = _trainer([*common, "--output-dir", str(tmp_path / "cut"), "--max-steps", "6"], FaultPlan())
    assert resumed.state.step == 3 and resumed.stream.micro_batches == 4, "the stream's own position came back"
    resumed.fit()
    (t_ref, e_ref), (t_cut, e_cut) = metrics(tmp_path / "ref"), metrics(tmp_path / "cut")
    assert [m["loss"] for m in t_cut] == pytest.approx([m["loss"] for m in t_ref], rel=1e-6)
    assert [e["loss"] for e in e_cut] == pytest.approx([e["loss"] for e in e_ref], rel=1e-6)
    assert t_cut[-1]["nonfinite_skips"] == 1 and t_cut[-1]["loss_scale_overflows"] == 0, "bf16 has no loss scale"
    flops = get_family("gpt").train_flops_per_sample(ref.inputs.model_config, ref.inputs.data)
    assert all(m["model_flops_per_step"] == pytest.approx(8 * flops, rel=1e-12) for m in t_ref + t_cut)
    assert all(m["tflops_per_gpu"] > 0 and m["mfu"] is None for m in t_ref), "no peak is known for a CPU"
    assert all(m["data_wait_s"] >= 0 and m["peak_memory_gb"] is None for m in t_ref), "no accelerator memory on a CPU"
    resolved = json.loads((tmp_path / "cut" / "resolved-config.json").read_text())
    assert resolved["optimization"]["lr"] == resolved["deepspeed"]["optimizer"]["params"]["lr"] == 2e-3
    assert resolved["batch"] == {"micro_batch_size": 8, "gradient_accumulation_steps": 1, "global_batch": 8}


def test_activation_checkpointing_in_a_real_run_gives_the_same_losses(prepared_stdlib, tmp_path):
    common = ["--data", str(prepared_stdlib), "--max-steps", "3", "--eval-every", "0", "--checkpoint-every", "0"]
    plain = _trainer(["--config", _recipe(tmp_path), *common, "--output-dir", str(tmp_path / "plain")])
    plain.fit()
    ac = _trainer(
        ["--config", _recipe(tmp_path, activation_checkpointing=True), *common, "--output-dir", str(tmp_path / "ac")]
    )
    assert any(getattr(m, "gradient_checkpointing", False) for m in ac.engine.module.modules())
    ac.fit()
    losses = [[m["loss"] for m in metrics(tmp_path / run)[0]] for run in ("plain", "ac")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_on_nonfinite_stop_ends_the_run_at_the_first_nan(prepared_stdlib, tmp_path):
    trainer = _trainer(
        [
            "--config",
            _recipe(tmp_path, on_nonfinite="stop"),
            "--data",
            str(prepared_stdlib),
            "--output-dir",
            str(tmp_path / "run"),
            "--max-steps",
            "5",
            "--eval-every",
            "0",
        ],
        FaultPlan(nan_loss_at=[2]),
    )
    with pytest.raises(TrainingStopped, match="non-finite loss at step 2.*on_nonfinite is 'stop'"):
        trainer.fit()
    assert trainer.state.step == 1


class HostReads:
    """Counts the reads of tensor values back to the host (``item``, ``tolist``, ``bool``,
    ``float``, ``int``) made by the toolkit's own code, not by DeepSpeed's: on a GPU each one waits
    for the device to drain."""

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self):
        self.count = 0

    def __enter__(self):
        import sys

        self._saved = {name: getattr(torch.Tensor, name) for name in self.METHODS}
        counter = self

        def wrap(original):
            def read(tensor, *args, **kwargs):
                if f"{os.sep}pretrain{os.sep}" in sys._getframe(1).f_code.co_filename:
                    counter.count += 1
                return original(tensor, *args, **kwargs)

            return read

        for name, original in self._saved.items():
            setattr(torch.Tensor, name, wrap(original))
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def test_with_gradient_accumulation_a_step_reads_the_host_once_and_a_nan_loss_skips_it_whole(prepared_stdlib, tmp_path):
    """gas 4 under ZeRO-2: one host read per optimizer step (not one per micro-batch). A NaN
    loss in micro-batch 0 of step 2 makes the optimizer refuse step 2 on every rank: the weights
    and the LR after it are those after step 1, all four micro-batches are consumed, and step 3
    trains normally. With on_nonfinite=stop the run stops there instead."""
    recipe = _recipe(tmp_path, micro_batch_size=2, gradient_accumulation_steps=4)
    common = [
        "--config",
        recipe,
        "--data",
        str(prepared_stdlib),
        "--max-steps",
        "5",
        "--eval-every",
        "0",
        "--checkpoint-every",
        "0",
    ]
    clean = _trainer([*common, "--output-dir", str(tmp_path / "clean")])
    clean.train_step(log=False)
    faulty = _trainer([*common, "--output-dir", str(tmp_path / "faulty")], FaultPlan(nan_loss_at=[2]))
    with HostReads() as reads:
        first = faulty.train_step(log=False)
        assert reads.count == 1, "one host read for a step of 4 micro-batches"
        second = faulty.train_step(log=False)
        assert reads.count == 2
    assert first["loss"] == pytest.approx(clean.state.train_losses[0], rel=1e-12) and second["loss"] != second["loss"]
    assert faulty.state.nonfinite_skips == 1 and faulty.state.step == 2 and faulty.engine.skipped_steps == 1
    assert faulty.stream.micro_batches == 8, "the skipped step's micro-batches are consumed, not replaced"
    assert faulty.hooks.losses_seen == [(1, m) for m in range(4)] + [(2, m) for m in range(4)]
    for (name, a), b in zip(clean.engine.module.state_dict().items(), faulty.engine.module.state_dict().values()):
        assert torch.equal(a, b), f"{name} changed in the refused step"
    assert faulty.engine.get_lr() == clean.engine.get_lr(), "the LR schedule did not advance"
    third = faulty.train_step(log=True)
    assert third["grad_norm"] is not None and third["grad_norm"] > 0 and third["loss"] == third["loss"]

    stop = _trainer(
        [
            "--config",
            _recipe(tmp_path, micro_batch_size=2, gradient_accumulation_steps=4, on_nonfinite="stop"),
            *common[2:],
            "--output-dir",
            str(tmp_path / "stop"),
        ],
        FaultPlan(nan_loss_at=[2]),
    )
    stop.train_step(log=False)
    with pytest.raises(
        TrainingStopped,
        match=r"non-finite loss at step 2 in 1 micro-batch\(es\) of 4 x 1 rank.*"
        r"on_nonfinite is 'stop'",
    ):
        stop.train_step(log=False)
    assert stop.state.step == 1 and stop.engine.skipped_steps == 1


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """About 200 train windows of 32 tokens: an epoch is some 25 steps of 8."""
    return prepare_small_corpus(tmp_path_factory.mktemp("tiny") / "data", 3, 5_000, 9_000, 400, 20)


def test_a_resume_with_another_micro_batch_size_and_worker_count_is_exact(tiny_corpus, tmp_path):
    """Same world size, micro_batch_size 8 -> 4 (x2 accumulation) and num_workers 0 -> 2: the
    stream re-divides the epoch, and the per-sample trace shows every sample of epoch 0 once."""
    n = json.loads((tiny_corpus / "manifest.json").read_text())["splits"]["train"]["samples"]
    trace = tmp_path / "trace"
    trace.mkdir()
    out = ["--data", str(tiny_corpus), "--output-dir", str(tmp_path / "run"), "--eval-every", "0"]
    first = _trainer(
        ["--config", _recipe(tmp_path, data={"shuffle_buffer": 16}), *out, "--max-steps", "5"],
        FaultPlan(trace_dir=trace),
    )
    first.fit()
    first.hooks.close()
    steps = 5 + -(-n // 8) + 3  # past the end of epoch 0 (8 sequences a step in both layouts)
    second = _trainer(
        [
            "--config",
            _recipe(
                tmp_path,
                micro_batch_size=4,
                gradient_accumulation_steps=2,
                peak_tflops=0.5,
                data={"shuffle_buffer": 16, "num_workers": 2},
            ),
            *out,
            "--max-steps",
            str(steps),
        ],
        FaultPlan(trace_dir=trace),
    )
    assert second.stream.state_dict()["data_history"] == [{"world": 1, "workers": 0, "micro": 8, "micro_batches": 5}]
    second.fit()
    second.hooks.close()
    ids = [i for line in (trace / "trace-rank0.txt").read_text().splitlines() for i in line.split("\t")[1].split()]
    assert len(ids) == steps * 8
    assert Counter(ids).most_common(1)[0][1] == 1, "no sample twice in one epoch"
    assert len({i for i in ids if i.startswith("0:")}) == n, "epoch 0 covered every train sample"
    train, _ = metrics(tmp_path / "run")
    assert all(m["mfu"] == pytest.approx(m["tflops_per_gpu"] / 0.5) for m in train[5:]), "training.peak_tflops"
    seal = json.loads((tmp_path / "run" / "checkpoints" / f"step_{steps:08d}" / "toolkit.json").read_text())
    assert seal["micro"] == 4 and seal["workers"] == 2 and len(seal["data_history"]) == 1
    assert os.environ["WORLD_SIZE"] == "1"


def test_a_weighted_mixture_of_corpora_logs_samples_by_source_and_resumes_exactly(prepared_stdlib, tmp_path):
    """data.sources: two prepared corpora (one tokenizer) weighted 3:1. Every train line counts the
    samples taken from each source; a run cut at step 3 and resumed from its cursors logs the
    uninterrupted run's losses and counts."""
    import sysconfig

    from data_pipelines.text.prepare import main as prepare_text

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    more = [str(p) for p in files if 4_000 < p.stat().st_size < 12_000][-12:]
    second = tmp_path / "more"
    assert (
        prepare_text(
            [
                *more,
                "--output",
                str(second),
                "--tokenizer",
                str(prepared_stdlib / "tokenizer"),
                "--seq-len",
                "64",
                "--val-fraction",
                "0.3",
                "--samples-per-shard",
                "20",
                "--no-progress",
            ]
        )
        == 0
    )
    sources = [
        {"name": "stdlib", "urls": str(prepared_stdlib), "weight": 3.0},
        {"name": "more", "urls": str(second), "weight": 1.0},
    ]
    recipe = _recipe(tmp_path, data={"sources": sources, "shuffle_buffer": 32})
    common = ["--config", recipe, "--eval-every", "0", "--checkpoint-every", "3"]
    _trainer([*common, "--output-dir", str(tmp_path / "ref"), "--max-steps", "6"]).fit()
    _trainer([*common, "--output-dir", str(tmp_path / "cut"), "--max-steps", "3"]).fit()
    resumed = _trainer([*common, "--output-dir", str(tmp_path / "cut"), "--max-steps", "6"])
    assert resumed.stream.dataset._resume, "continued from the saved cursors, not replayed"
    resumed.fit()
    assert resumed.stream.dataset.io["shards_opened"] <= 2 * 4, "a resume opens a few shards per source"
    (t_ref, _), (t_cut, _) = metrics(tmp_path / "ref"), metrics(tmp_path / "cut")
    assert [m["loss"] for m in t_cut] == pytest.approx([m["loss"] for m in t_ref], rel=1e-6)
    assert [m["samples_by_source"] for m in t_cut] == [m["samples_by_source"] for m in t_ref]
    assert all(sum(m["samples_by_source"].values()) == m["samples"] for m in t_ref)
    assert t_ref[-1]["samples_by_source"]["more"] > 0 and t_ref[-1]["samples_by_source"]["stdlib"] > 0
