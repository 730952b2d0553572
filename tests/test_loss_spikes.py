"""Loss spikes rewound and their data skipped (issue 24, part 1): the spike rule, the run's ledger,
skipped ranges in the data stream's position (same layout and across a change of layout), and real
engines in one process: a corpus with one shard of random tokens triggers a rewind, its samples are
never trained after it, and the final weights equal a run given the same steps with skip_steps. The
kill -9 after a rewind runs the real command line (slow)."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from data_pipelines.loader import train_loader
from data_pipelines.loader.slots import Slot, epoch_shards
from pretrain.run.config import LossSpikeConfig
from pretrain.runtime.spikes import SkipLedger, SpikeDetector, spike_limit
from tests.faults import FaultPlan
from tests.launch import FAULTS, REPO, deepspeed_cmd, inprocess_trainer, prepare_small_corpus, run
from tests.launch import world_of_one as launch_world_of_one
from tests.test_loader import make_dataset

# ------------------------------------------------------------------------------------ the rule


def test_the_limit_is_the_window_median_plus_threshold_robust_deviations():
    window = [3.0, 3.1, 2.9, 3.0, 3.2, 2.8, 3.0]
    mad = 0.1  # median of |x - 3.0|
    assert spike_limit(window, 6.0) == pytest.approx(3.0 + 6.0 * 1.4826 * mad)
    assert spike_limit(window[:4], 6.0) is None, "too few steps to know the noise"
    # a flat window: sigma is at least 1% of the median, so rounding is no spike
    assert spike_limit([2.0] * 10, 6.0) == pytest.approx(2.0 * (1 + 6 * 0.01))


def test_a_spike_on_one_rank_is_found_and_kept_out_of_the_window():
    cfg = LossSpikeConfig(action="rewind", window=8, threshold=5.0, min_steps=6)
    det = SpikeDetector(cfg)
    rng = np.random.default_rng(0)
    for step in range(1, 11):
        assert det.judge(step, [3.0 + 0.02 * rng.standard_normal(), 3.0 + 0.02 * rng.standard_normal()]) is None
    before = list(det.window)
    verdict = det.judge(11, [3.0, 4.5])  # rank 1 alone: the mean (3.75) would be judged too, but not hidden
    assert verdict is not None and verdict["rank"] == 1 and verdict["loss_max"] == 4.5
    assert verdict["action"] == "rewind" and verdict["limit"] < 4.5
    assert det.window == before, "a spike does not raise the reference"
    assert det.judge(12, [3.01, float("nan")]) is None, "a non-finite loss is the non-finite rules' business"
    # not judged before min_steps: a fast-falling start is not a spike
    young = SpikeDetector(cfg)
    assert all(young.judge(s, [10.0 / s]) is None for s in range(1, 6)) and young.judge(6, [50.0]) is None


def test_the_ledger_survives_a_new_process_and_says_when_the_lr_is_lowered(tmp_path):
    led = SkipLedger(tmp_path, write=True)
    r = {"segment": 0, "first": 41, "last": 48, "steps": 8, "at_step": 6, "why": "rewind"}
    led.add(r, {"spike_step": 13, "lr_factor": 0.5, "lr_steps": 3, "lr_until": 16})
    led.add(dict(r))  # the same range again is not a second range
    again = SkipLedger(tmp_path, write=False)
    assert again.ranges == [r] and len(again.rewinds) == 1
    assert again.lr_lowered(13) is None and again.lr_lowered(14) == (0.5, 16) and again.lr_lowered(17) is None
    again.reset()  # a reader never deletes
    assert (tmp_path / "skipped-data.json").is_file()


# ------------------------------------------------------------------------- ranges in the stream


def _ids(stream, n):
    return [i for _ in range(n) for i in next(stream).meta["ids"]]


def test_a_skipped_range_is_read_and_recorded_in_the_position(tmp_path):
    data = make_dataset(tmp_path, {"train": [20] * 6})
    a = train_loader(data, "train", 4, 0, 1, seed=3, shuffle_buffer=8, trace=True)
    b = train_loader(data, "train", 4, 0, 1, seed=3, shuffle_buffer=8, trace=True)
    _ids(a, 3)
    first, last = a.skip(4)
    assert (first, last) == (4, 7) and a.micro_batches == 7
    a.add_skips([{"segment": 0, "first": 4, "last": 7, "steps": 4, "at_step": 4, "why": "t"}])
    _ids(b, 7)
    assert _ids(a, 2) == _ids(b, 2), "after the skip the stream goes on where reading left it"
    state = a.state_dict()
    assert state["skips"][0]["first"] == 4
    c = train_loader(data, "train", 4, 0, 1, seed=3, shuffle_buffer=8, trace=True)
    c.load_state_dict(state)
    assert c.skips == state["skips"] and c.pending_skip(4) is None


def test_a_range_ahead_of_the_position_stays_skipped_across_a_change_of_world_size(tmp_path):
    """Saved on 2 ranks at micro-batch 3 with micro-batches 4..6 of each rank to be skipped (a rewind's
    range that the checkpoint does not know yet); resumed on 1 rank: the rest of the epoch is every
    sample that neither the 3 read batches nor the skipped ones hold, each once."""
    data = make_dataset(tmp_path, {"train": [20] * 6})
    common = dict(seed=5, shuffle_buffer=8, trace=True)
    ranks = [train_loader(data, "train", 4, r, 2, **common) for r in range(2)]
    read = {i for s in ranks for i in _ids(s, 3)}
    state = ranks[0].state_dict()
    skipped = {i for s in ranks for i in _ids(s, 3)}
    state["skips"] = [{"segment": 0, "first": 4, "last": 6, "steps": 3, "at_step": 4, "why": "rewind"}]
    one = train_loader(data, "train", 4, 0, 1, **common)
    one.load_state_dict(state)
    rest = 120 - len(read) - len(skipped)
    got = _ids(one, rest // 4)
    assert len(set(got)) == len(got) == rest
    assert all(i.split(":", 1)[0] == "0" for i in got), "the rest of epoch 0 first"
    assert not set(got) & (read | skipped)


def test_the_steps_of_a_range_left_out_on_another_layout_are_still_moved_past():
    """After a change of world size the stream left a rewind's range out of the re-divided epoch; the
    trainer still moves its counter past the range's steps when it reaches them (nothing is read)."""
    from types import SimpleNamespace

    from pretrain.runtime.rewind import DataSkips

    r = {"segment": 0, "first": 41, "last": 48, "steps": 4, "at_step": 11, "why": "rewind: loss spike at step 14"}
    stream = SimpleNamespace(skips=[r], segment=1, pending_skip=lambda step: None)
    trainer = SimpleNamespace(recipe=SimpleNamespace(training=SimpleNamespace(skip_steps=[])), stream=stream, gas=2)
    assert DataSkips._skip_due(trainer, 10) is None
    assert DataSkips._skip_due(trainer, 11) == (4, 0, r["why"], r)


# ------------------------------------------------------------------------------- real engines


@pytest.fixture(scope="module")
def world_of_one():
    with launch_world_of_one():
        yield


def _random_shard(root: Path, position: int) -> tuple[set[str], str]:
    """Random tokens in the shard that epoch 0 reads at ``position`` of its order (world 1 reads it at
    step position + 1; on 2 ranks rank position % 2 reads it at step position // 2 + 1)."""
    split = json.loads((root / "manifest.json").read_text())["splits"]["train"]
    shards = [str(root / s) for s in split["shards"]]
    full = {s for s, n in zip(shards, split["shard_samples"]) if n == 8}
    order, _ = epoch_shards(shards, Slot(), 0, 1234)
    assert len(order) >= 34 and all(s in full for s in order[: position + 1]), "the corpus must fill epoch 0"
    bad = order[position]
    rng = np.random.default_rng(7)
    samples = list(wds.WebDataset(bad, shardshuffle=False))
    with wds.TarWriter(bad + ".tmp") as out:
        for s in samples:
            tokens = np.load(io.BytesIO(s["tokens.npy"]))
            buf = io.BytesIO()
            np.save(buf, rng.integers(0, 512, size=tokens.shape).astype(tokens.dtype))
            out.write({"__key__": s["__key__"], "tokens.npy": buf.getvalue()})
    os.replace(bad + ".tmp", bad)
    return {s["__key__"] for s in samples}, Path(bad).name


def _corpus(tmp_path_factory, position: int):
    """Shards of exactly 8 windows (a step's micro-batch, read in order: shuffle_buffer 1), one of random tokens."""
    root = prepare_small_corpus(tmp_path_factory.mktemp("spiky") / "data", 12, 4000, 12000, 512, 8)
    keys, name = _random_shard(root, position)
    return root, keys, name


@pytest.fixture(scope="module")
def spiky_corpus(tmp_path_factory):
    """World 1 reads the random shard at step 21."""
    return _corpus(tmp_path_factory, 20)


def _recipe(tmp_path: Path, name: str, **training) -> str:
    r = json.loads((REPO / "pretrain/recipes/gpt-tiny.json").read_text())
    r["model"].update(hidden_size=64, num_layers=2, num_heads=2)
    r["data"].update(shuffle_buffer=1)
    r["training"].update({"max_steps": 32, "warmup_steps": 2, "lr": 3e-3, **training})
    r["eval"].update(every=0, max_samples=16)
    r["checkpoint"].update(every=5, keep_last=None)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(r))
    return str(path)


SPIKE = {"action": "rewind", "window": 10, "threshold": 6.0, "min_steps": 8}


def _train(recipe: str, data: Path, out: Path, hooks=None):
    trainer = inprocess_trainer(["--config", recipe, "--data", str(data), "--output-dir", str(out)], hooks)
    trainer.fit()
    weights = {k: v.detach().clone() for k, v in trainer.engine.module.state_dict().items()}
    return trainer, weights


def _events(run: Path, name: str) -> list[dict]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [x for x in lines if x.get("event") == name]


def _trace(trace: Path, keys: set[str]) -> list[tuple[int, bool]]:
    """(step, whether it held a sample of the random shard) of every traced micro-batch, in order."""
    out = []
    for line in trace.read_text().splitlines():
        step, ids = line.split("\t")
        out.append((int(step), any(i.split(":")[-1] in keys for i in ids.split())))
    return out


def test_a_random_token_shard_is_rewound_and_equals_skip_steps_given_up_front(world_of_one, spiky_corpus, tmp_path):
    data, bad_keys, _ = spiky_corpus
    traces = tmp_path / "trace"
    traces.mkdir()
    a, wa = _train(_recipe(tmp_path, "a", loss_spike=SPIKE), data, tmp_path / "a", FaultPlan(trace_dir=traces))
    rewinds = _events(tmp_path / "a", "rewind")
    assert len(rewinds) == 1, rewinds
    rw = rewinds[0]
    assert rw["spike_step"] == 21 and rw["checkpoint"] == "step_00000020" and rw["step"] == 20
    assert rw["loss_max"] > rw["limit"]
    trace = _trace(traces / "trace-rank0.txt", bad_keys)
    assert [s for s, bad in trace if bad] == [21], "the random shard is step 21's batch, and only its"
    assert [s for s, _ in trace] == [s for s in range(1, 33)], "after the rewind: step 22 on, nothing twice"
    skipped = _events(tmp_path / "a", "skipped_data")
    assert [s["steps"] for s in skipped] == [[21, 21]] and skipped[0]["micro_batches"] == [21, 21]
    assert a.state.step == 32 and a.state.samples_skipped == 8
    ledger = json.loads((tmp_path / "a" / "skipped-data.json").read_text())
    assert ledger["ranges"][0]["first"] == 21 and ledger["rewinds"][0]["spike_step"] == 21
    lines = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    train_steps = [x["step"] for x in lines if "loss" in x and "event" not in x and "split" not in x]
    assert train_steps == [s for s in range(1, 33) if s != 21], "one line per trained step, none twice"

    # pretrain-plot draws them: the spike (x at step 21, the loudest rank's loss) and the skipped step's span
    import matplotlib.pyplot as plt

    from pretrain.cli.plot import _event_marks, plot_run

    fig, ax = plt.subplots()
    _event_marks(ax, _events(tmp_path / "a", "rewind") + skipped)
    marks = [line for line in ax.lines if line.get_marker() == "x"]
    assert len(marks) == 1 and list(marks[0].get_xdata()) == [21] and list(marks[0].get_ydata()) == [rw["loss_max"]]
    assert len(ax.patches) == 1 and ax.patches[0].get_x() == 20.5
    plt.close(fig)
    assert (tmp_path / "a" / "plots" / "loss.png") in plot_run(tmp_path / "a")

    _, wb = _train(_recipe(tmp_path, "b", skip_steps=[[21, 21]]), data, tmp_path / "b")
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max() / (wb[k].abs().max() + 1e-12)) for k in wa)
    assert worst < 1e-6, f"rewound run differs from skip_steps by {worst:.2e}"


@pytest.mark.slow
def test_a_kill_after_the_rewind_resumes_with_the_range_skipped_and_no_second_rewind(tmp_path_factory, tmp_path):
    """2 ranks through the launcher; the random shard is rank 1's batch at step 21, so only rank 1's
    loss spikes (rank 0's view alone would miss it). Every process is killed (SIGKILL) at step 23, after
    the rewind to step 20 and before the next checkpoint (25): the resume starts from step 20's
    checkpoint, skips step 21's data again from the ledger, meets no spike, and ends with one rewind."""
    data, _, _ = _corpus(tmp_path_factory, 41)
    recipe = _recipe(tmp_path, "k", loss_spike=SPIKE, max_steps=26)
    argv = ["--config", recipe, "--data", str(data), "--output-dir", str(tmp_path / "k"), "--no-progress"]
    first = run(deepspeed_cmd(2, ["--kill-at", "23", "--", *argv], script=FAULTS), check=False)
    assert first.returncode != 0, first.stdout[-3000:]
    assert "warning: loss spike at step 21: rank 1's loss" in first.stdout, first.stdout[-3000:]
    assert "rewound to step_00000020" in first.stdout
    second = run(deepspeed_cmd(2, argv))
    assert "resumed from" in second.stdout and "step_00000020" in second.stdout
    assert "warning: loss spike" not in second.stdout, "the same spike met twice"
    assert "skipped the data of steps 21..21" in second.stdout
    out = tmp_path / "k"
    assert len(_events(out, "rewind")) == 1 and len(json.loads((out / "skipped-data.json").read_text())["rewinds"]) == 1
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if "loss" in x and "event" not in x and "split" not in x]
    assert steps == [s for s in range(1, 27) if s != 21]


def test_action_skip_drops_the_spike_steps_update(world_of_one, spiky_corpus, tmp_path):
    """ZeRO-2: step 21's update is refused on purpose; the weights after it are those of step 20's checkpoint."""
    data, _, _ = spiky_corpus
    spike = {**SPIKE, "action": "skip"}
    trainer, weights = _train(_recipe(tmp_path, "s", loss_spike=spike, max_steps=21), data, tmp_path / "s")
    (event,) = _events(tmp_path / "s", "loss_spike")
    assert event["step"] == 21 and event["action"] == "skip" and event["skipped_update"] is True
    assert trainer.state.spike_skips == 1 and trainer.state.nonfinite_skips == 0
    saved = torch.load(tmp_path / "s/checkpoints/step_00000020/mp_rank_00_model_states.pt", weights_only=False)
    before = {k.removeprefix("module."): v for k, v in saved["module"].items()}
    assert all(torch.equal(weights[k], before[k]) for k in weights), "the spike's update was applied"


def test_past_max_rewinds_the_run_stops_with_its_own_exit_code(world_of_one, spiky_corpus, tmp_path):
    from pretrain.runtime.rewind import SpikesStopped

    data, _, _ = spiky_corpus
    spike = {**SPIKE, "max_rewinds": 0}
    with pytest.raises(SpikesStopped, match="max_rewinds=0") as stopped:
        _train(_recipe(tmp_path, "m", loss_spike=spike, max_steps=22), data, tmp_path / "m")
    assert stopped.value.exit_code == 76


def test_z_loss_is_added_per_trained_token_and_logged_apart(world_of_one, spiky_corpus, tmp_path):
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    from pretrain.models.z_loss import ZLossSum

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16)).eval()
    ids = torch.randint(0, 50, (2, 8))
    labels = ids.clone()
    labels[0, :3] = -100  # untrained tokens add neither term
    z = ZLossSum(1e-2)
    got = z(model, {"input_ids": ids, "labels": labels})
    logits = model(input_ids=ids).logits.float()
    ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    term = 1e-2 * (torch.logsumexp(logits, -1).pow(2) * (labels != -100)).sum()
    assert torch.allclose(got, ce + term, rtol=1e-6) and torch.allclose(z.take().float(), term, rtol=1e-6)
    assert z.take() is None, "taken once"

    data, _, _ = spiky_corpus
    _train(_recipe(tmp_path, "z", z_loss=1e-3, max_steps=3), data, tmp_path / "z")
    lines = [json.loads(x) for x in (tmp_path / "z/metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if "z_loss" in x]
    assert len(train) == 3 and all(x["z_loss"] > 0 and 4 < x["loss"] < 8 for x in train)


def test_skip_steps_flags_and_the_skip_action_under_zero0_are_checked_before_the_run(spiky_corpus, tmp_path):
    from pretrain.run.config import RecipeError
    from pretrain.train import build_parser, prepare

    data, _, _ = spiky_corpus
    recipe = _recipe(tmp_path, "f", skip_steps=[[3, 4]])
    args = build_parser().parse_args(["--config", recipe, "--data", str(data), "--skip-steps", "9:11"])
    resolved, _, _ = prepare(args)
    assert resolved.recipe.training.skip_steps == [(3, 4), (9, 11)]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--config", recipe, "--skip-steps", "9-11"])
    assert "robust standard deviations" in build_parser().format_help(), "--help says what the threshold means"
    bad = build_parser().parse_args(["--config", recipe, "--data", str(data), "--skip-steps", "4:5"])
    with pytest.raises(RecipeError, match="skip_steps: ranges overlap"):
        prepare(bad)
    zero0 = _recipe(tmp_path, "z0", loss_spike={**SPIKE, "action": "skip"})
    args = build_parser().parse_args(
        ["--config", zero0, "--data", str(data), "--deepspeed_config", "ds_configs/zero0_fp32.json"]
    )
    with pytest.raises(RecipeError, match="loss_spike.action: skip .* ZeRO-0"):
        prepare(args)


def test_a_rewind_lowers_the_lr_for_lr_steps_steps_then_the_schedule_goes_on(world_of_one, spiky_corpus, tmp_path):
    data, _, _ = spiky_corpus
    spike = {**SPIKE, "lr_factor": 0.5, "lr_steps": 2}
    _train(_recipe(tmp_path, "lo", loss_spike=spike, max_steps=24), data, tmp_path / "lo")
    _train(_recipe(tmp_path, "ref", skip_steps=[[21, 21]], max_steps=24), data, tmp_path / "ref")

    def lrs(run):
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {x["step"]: x["lr"] for x in lines if "lr" in x and "event" not in x and "split" not in x}

    lowered, ref = lrs(tmp_path / "lo"), lrs(tmp_path / "ref")
    assert sorted(lowered) == sorted(ref) == [s for s in range(1, 25) if s != 21]
    assert all(lowered[s] == ref[s] for s in range(1, 21)) and lowered[24] == pytest.approx(ref[24], rel=1e-12)
    assert [lowered[s] / ref[s] for s in (22, 23)] == pytest.approx([0.5, 0.5], rel=1e-12)
    (event,) = _events(tmp_path / "lo", "lr_lowered")
    assert event["steps"] == [22, 23] and event["lr_factor"] == 0.5


def test_the_spike_reference_restarts_when_the_batch_layout_changes(tmp_path):
    """A rank's loss is over its own micro-batches and the step is judged by its loudest rank, so the window's
    spread belongs to a layout: resumed on another (ranks, micro, accumulation), the reference starts afresh."""
    from types import SimpleNamespace

    from pretrain.runtime.rewind import DataSkips
    from pretrain.runtime.state import RunState

    def setup(layout):
        state = RunState(loss_window=[3.0] * 10, spike_seen=30, spike_layout=[2, 8, 1])
        t = SimpleNamespace(
            run_dir=tmp_path, is_main=False, state=state, world=layout[0], micro=layout[1], gas=layout[2],
            stream=SimpleNamespace(pending_skip=None, add_skips=lambda ranges: None),
            recipe=SimpleNamespace(training=SimpleNamespace(loss_spike=LossSpikeConfig(action="warn"))),
        )  # fmt: skip
        DataSkips._setup_skips(t, resumed=True)
        return t

    same = setup([2, 8, 1])
    assert same.spikes.window == [3.0] * 10 and same.spikes.seen == 30
    for other in ([4, 8, 1], [2, 4, 2]):
        moved = setup(other)
        assert moved.spikes.window == [] and moved.spikes.seen == 0 and moved.state.spike_layout == other
