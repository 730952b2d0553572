"""Checkpoints written in the background, sealed with their files' checksums, verified before a load
(issue 24, part 2). Real DeepSpeed engines in a gloo world of one; the multi-rank seal is in
tests/test_background_save_integration.py."""

import collections
import json
import shutil
from pathlib import Path

import pytest
import torch

from pretrain.runtime.checkpoint import CheckpointError, CheckpointManager, complete_tags
from pretrain.runtime.ckpt_verify import NO_CHECKSUMS, file_entry, tag_files, verify_tag
from pretrain.runtime.ckpt_writer import Staging, snapshot
from pretrain.runtime.trainer import Trainer, TrainingStopped
from tests.faults import FaultPlan
from tests.launch import REPO, inprocess_trainer, metrics, module_cmd, run
from tests.launch import world_of_one as launch_world_of_one
from tests.test_trainer_inprocess import _engine, _train_one_step


@pytest.fixture(scope="module", autouse=True)
def world_of_one():
    with launch_world_of_one():
        yield


def _trainer(argv: list[str], hooks=None) -> Trainer:
    return inprocess_trainer(argv, hooks)


def _recipe(tmp_path: Path, **checkpoint) -> str:
    r = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())
    r["checkpoint"].update(checkpoint)
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.json"
    path.write_text(json.dumps(r))
    return str(path)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _verify_cli(*args: str):
    return run(module_cmd("pretrain.cli.ckpt", ["verify", *map(str, args)]), check=False, timeout=120)


# ------------------------------------------------------------------------------------ units


def test_snapshot_copies_tensors_and_keeps_container_types():
    point = collections.namedtuple("point", "x y")
    t = torch.arange(6.0)
    d = collections.defaultdict(list, a=[t[:3]])
    state = {"o": collections.OrderedDict(w=t), "d": d, "p": point(t, 3), "s": "x", "n": None}
    copy = snapshot(state)
    t += 100
    assert torch.equal(copy["o"]["w"], torch.arange(6.0)), "a copy, not a view of the training tensor"
    assert type(copy["o"]) is collections.OrderedDict and type(copy["p"]) is point and copy["p"].y == 3
    assert type(copy["d"]) is collections.defaultdict and copy["d"].default_factory is list
    assert copy["d"]["a"][0].tolist() == [0.0, 1.0, 2.0] and copy["s"] == "x" and copy["n"] is None


def test_staging_buffers_are_reused_from_one_save_to_the_next():
    staging = Staging()
    a = snapshot({"w": torch.ones(4), "b": torch.zeros(2)}, staging)
    staging.reset()
    b = snapshot({"w": torch.full((4,), 2.0), "b": torch.zeros(3)}, staging)
    assert b["w"] is a["w"] and b["w"].tolist() == [2.0] * 4, "same shape and dtype: the warm buffer, refilled"
    assert b["b"] is not a["b"] and b["b"].shape == (3,), "another shape: a new buffer"


def test_the_seal_lists_every_file_and_a_corrupt_checkpoint_is_refused_naming_the_file(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    manager = CheckpointManager(root, rank=0, world=1, zero_stage=2, seed=1, background=True)
    engine = _engine(0)
    for step in (1, 2):
        _train_one_step(engine, step)
        manager.save(engine, step, {"step": step}, {"micro_batches": step})
    manager.flush()
    records = manager.take_records()
    assert [(r["event"], r["tag"]) for r in records] == [("checkpoint", f"step_0000000{i}") for i in (1, 2)]
    assert all(r["save_s"] >= r["save_blocking_s"] >= 0 for r in records)
    for tag in complete_tags(root):
        seal = json.loads((tag / "toolkit.json").read_text())
        assert sorted(seal["files"]) == tag_files(tag) and len(seal["files"]) >= 3, "every file, zero_to_fp32.py too"
        assert all(seal["files"][rel] == file_entry(tag / rel) for rel in seal["files"])
        assert verify_tag(tag).verified

    p = _verify_cli(root.parent)
    assert p.returncode == 0 and "step_00000002 (latest)" in p.stdout and "2 checkpoint(s) ok" in p.stdout, p.stdout

    newest = root / "step_00000002"
    optim = next(newest.glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[:-100])  # truncated
    p = _verify_cli(root)
    assert p.returncode == 1 and str(optim) in p.stdout and "truncated" in p.stdout, p.stdout
    p = _verify_cli(newest, "--json")
    report = json.loads(p.stdout)
    assert p.returncode == 1 and report["ok"] is False and str(optim) in report["checkpoints"][0]["problems"][0]
    assert _verify_cli(root / "step_00000001").returncode == 0

    # --resume auto refuses it, names the file, and falls back to the previous sealed checkpoint
    capsys.readouterr()
    resumed = CheckpointManager(root, rank=0, world=1, zero_stage=2, seed=1)
    out = capsys.readouterr().out
    assert resumed.target == root / "step_00000001"
    assert f"checkpoint step_00000002 refused: {optim}" in out
    assert "falling back to the previous sealed checkpoint step_00000001" in out
    assert resumed.sealed_before(3) == root / "step_00000001", "a rewind never targets a corrupt checkpoint"
    # an explicit --resume of it is refused
    with pytest.raises(CheckpointError, match=f"refused, it fails verification: {optim}"):
        CheckpointManager(root, rank=0, world=1, zero_stage=2, seed=1, resume=str(newest))

    # a flipped byte in the older one too: nothing to fall back to
    _flip_byte(next((root / "step_00000001").glob("*model_states.pt")))
    assert _verify_cli(root / "step_00000001").returncode == 1
    with pytest.raises(CheckpointError, match="no sealed checkpoint .* passes verification"):
        CheckpointManager(root, rank=0, world=1, zero_stage=2, seed=1)

    # a seal written before checksums existed: loadable, reported as unverifiable
    seal_path = root / "step_00000001" / "toolkit.json"
    seal_path.write_text(json.dumps({k: v for k, v in json.loads(seal_path.read_text()).items() if k != "files"}))
    shutil.rmtree(newest)
    p = _verify_cli(root)
    assert p.returncode == 0 and NO_CHECKSUMS in p.stdout, p.stdout
    assert CheckpointManager(root, rank=0, world=1, zero_stage=2, seed=1).target == root / "step_00000001"
    assert NO_CHECKSUMS in capsys.readouterr().out


def test_verify_explains_its_flags_and_refuses_a_folder_without_checkpoints(tmp_path):
    p = run(module_cmd("pretrain.cli.ckpt", ["verify", "--help"]), timeout=120)
    assert "--json" in p.stdout and "Exit 0" in p.stdout
    assert _verify_cli(tmp_path).returncode == 2


# ------------------------------------------------------------------------------------ the trainer


def test_a_flipped_byte_in_the_newest_checkpoint_falls_back_and_ends_as_a_direct_resume(
    prepared_stdlib, tmp_path, capsys
):
    """Issue 24's done-when: the run resumed with --resume auto refuses the corrupt newest checkpoint,
    loads the previous one, and its final weights equal those of a run resumed from that one directly."""
    common = ["--config", "gpt-tiny", "--data", str(prepared_stdlib), "--eval-every", "0", "--checkpoint-every", "2"]
    first = _trainer([*common, "--output-dir", str(tmp_path / "auto"), "--max-steps", "4"])
    first.fit()
    shutil.copytree(tmp_path / "auto", tmp_path / "direct")
    model_file = next((tmp_path / "auto" / "checkpoints" / "step_00000004").glob("*model_states.pt"))
    _flip_byte(model_file)

    capsys.readouterr()
    auto = _trainer([*common, "--output-dir", str(tmp_path / "auto"), "--max-steps", "6"])
    out = capsys.readouterr().out
    assert f"checkpoint step_00000004 refused: {model_file}" in out and "corrupted" in out
    assert "falling back to the previous sealed checkpoint step_00000002" in out
    assert auto.state.step == 2
    auto.fit()
    direct_tag = tmp_path / "direct" / "checkpoints" / "step_00000002"
    direct_run = ["--output-dir", str(tmp_path / "direct"), "--max-steps", "6", "--resume", str(direct_tag)]
    direct = _trainer([*common, *direct_run])
    assert direct.state.step == 2
    direct.fit()
    for (name, a), b in zip(auto.engine.module.state_dict().items(), direct.engine.module.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    losses = [[m["loss"] for m in metrics(tmp_path / d)[0]] for d in ("auto", "direct")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6) and len(losses[0]) == 6
    events = [json.loads(line) for line in (tmp_path / "auto" / "metrics.jsonl").read_text().splitlines()]
    saves = [e for e in events if e.get("event") == "checkpoint"]
    assert [e["tag"] for e in saves] == ["step_00000002", "step_00000004", "step_00000006"]
    assert all(e["save_s"] >= e["save_blocking_s"] > 0 and e["background"] for e in saves)


@pytest.mark.parametrize("background", [True, False])
def test_a_full_disk_stops_the_run_naming_the_path_and_errno_and_latest_stays(prepared_stdlib, tmp_path, background):
    out = tmp_path / "run"
    args = ["--data", str(prepared_stdlib), "--output-dir", str(out), "--max-steps", "6", "--eval-every", "0"]
    trainer = _trainer(
        ["--config", _recipe(tmp_path, every=2, background=background), *args], FaultPlan(disk_full_at=(4, None))
    )
    with pytest.raises(TrainingStopped, match=r"step_00000004/\S+: \[Errno 28 ENOSPC\] No space left on device"):
        trainer.fit()
    assert trainer.state.step <= 5, "stopped at the save or at the next step"
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002"
    assert not (out / "checkpoints" / "step_00000004").exists(), "never a half-written tag"


def test_on_error_continue_logs_the_failed_save_and_saves_again(prepared_stdlib, tmp_path):
    out = tmp_path / "run"
    args = ["--data", str(prepared_stdlib), "--output-dir", str(out), "--max-steps", "6", "--eval-every", "0"]
    trainer = _trainer(
        ["--config", _recipe(tmp_path, every=2, on_error="continue"), *args], FaultPlan(disk_full_at=(4, None))
    )
    trainer.fit()
    assert trainer.state.step == 6
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"event"' in line]
    failed = [e for e in events if e["event"] == "checkpoint_failed"]
    assert len(failed) == 1 and failed[0]["step"] == 4 and "[Errno 28 ENOSPC]" in failed[0]["error"]
    assert "step_00000004" in failed[0]["error"]
    assert [e["tag"] for e in events if e["event"] == "checkpoint"] == ["step_00000002", "step_00000006"]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000006"
    assert [t.name for t in complete_tags(out / "checkpoints")] == ["step_00000002", "step_00000006"]
    assert _verify_cli(out).returncode == 0
