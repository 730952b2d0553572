"""Prepared folders, node parts and output folders that someone else wrote: every path a manifest or
a node part names must stay inside its folder (never a `pipe:` command, a URL, an absolute path or
`..`), prepare-merge touches only a node's own shards, --overwrite replaces only a dataset of ours,
and the user errors of the CLIs are one line and exit 2, not a traceback."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import webdataset as wds

from data_pipelines import nodes
from data_pipelines.image.loader import ImageTextShards
from data_pipelines.loader import TextShards
from data_pipelines.manifest import ManifestError, write_manifest
from data_pipelines.text import prepare

FLAGS = ["--seq-len", "32", "--val-fraction", "0.3", "--no-progress"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, stdlib_files) -> dict[str, Path]:
    """A single-machine text folder (its tokenizer trained, vocab 300) and the two node parts of
    another run of the same files, not yet merged; copy them before editing."""
    root = tmp_path_factory.mktemp("hostile")
    files = [str(f) for f in stdlib_files[:6]]
    assert prepare.main([*files, "--output", str(root / "single"), "--vocab-size", "300", *FLAGS]) == 0
    tokenizer = str(root / "single" / "tokenizer")
    for rank in ("0", "1"):
        node = ["--num-nodes", "2", "--node-rank", rank]
        assert prepare.main([*files, "--output", str(root / "nodes"), "--tokenizer", tokenizer, *FLAGS, *node]) == 0
    return {"single": root / "single", "nodes": root / "nodes", "files": root}


def copy_with(source: Path, target: Path, edit: Callable[[dict], None], name: str = "manifest.json") -> Path:
    shutil.copytree(source, target)
    data = json.loads((target / name).read_text())
    edit(data)
    (target / name).write_text(json.dumps(data))
    return target


@pytest.fixture
def isolated_env(monkeypatch):
    # pretrain.train.main() makes a one-process world in os.environ; keep it out of the other tests.
    monkeypatch.setattr(os, "environ", dict(os.environ))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)


# ---------------------------------------------------------------------------------------------
# 1. the paths a manifest names


def test_a_pipe_shard_is_refused_and_never_run(prepared, tmp_path, monkeypatch) -> None:
    def edit(m: dict) -> None:
        m["splits"]["train"]["shards"][0] = "pipe:touch MARKER"

    folder = copy_with(prepared["single"], tmp_path / "data", edit)
    monkeypatch.chdir(folder)  # a relative folder: "./pipe:..." would be the command itself
    with pytest.raises(ManifestError) as info:
        data = TextShards(".")
        for _ in wds.WebDataset(data.shards("train"), shardshuffle=False):
            pass
    assert not (folder / "MARKER").exists()
    assert "manifest.json" in str(info.value) and "'pipe:touch MARKER'" in str(info.value)


@pytest.mark.parametrize("where", ["dotdot", "absolute", "url", "tokenizer"])
def test_a_shard_or_tokenizer_outside_the_folder_is_refused(prepared, tmp_path, where) -> None:
    outside = tmp_path / "outside.tar"
    shutil.copy(next((prepared["single"] / "train").glob("*.tar")), outside)
    entry = {"dotdot": "../outside.tar", "absolute": str(outside), "url": "http://example.com/x.tar"}.get(
        where, "../single/tokenizer"
    )

    def edit(m: dict) -> None:
        if where == "tokenizer":
            m["tokenizer"]["path"] = entry
        else:
            m["splits"]["train"]["shards"][0] = entry

    folder = copy_with(prepared["single"], tmp_path / "data", edit)
    with pytest.raises(ManifestError) as info:
        TextShards(folder)
    assert str(folder / "manifest.json") in str(info.value) and repr(entry) in str(info.value)


def test_a_shard_linked_out_of_the_folder_is_refused(prepared, tmp_path) -> None:
    folder = tmp_path / "data"
    shutil.copytree(prepared["single"], folder)
    (tmp_path / "secret.tar").write_bytes(b"secret")
    shard = next((folder / "train").glob("*.tar"))
    shard.unlink()
    shard.symlink_to(tmp_path / "secret.tar")
    with pytest.raises(ManifestError, match="outside"):
        TextShards(folder)


def test_training_on_a_hostile_folder_stops_with_exit_2(prepared, tmp_path, capsys, isolated_env) -> None:
    from pretrain.train import main

    def edit(m: dict) -> None:
        m["splits"]["train"]["shards"][0] = "/etc/passwd"

    folder = copy_with(prepared["single"], tmp_path / "data", edit)
    assert main(["--config", "gpt-tiny", "--data", str(folder), "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "manifest.json" in err and "'/etc/passwd'" in err and "Traceback" not in err


@pytest.mark.parametrize("key", ["classes", "tokenizer"])
def test_an_image_class_list_or_tokenizer_outside_the_folder_is_refused(tmp_path, key) -> None:
    (tmp_path / "secret.json").write_text('{"classnames": ["x"]}')
    root = tmp_path / "images"
    root.mkdir()
    manifest = {"kind": "image-text", "version": 1, "image_size": 24, "tokenizer": None, "splits": {}}
    manifest[key] = "../secret.json" if key == "classes" else {"path": str(tmp_path)}
    write_manifest(root, manifest)
    with pytest.raises(ManifestError, match="manifest.json"):
        ImageTextShards(root).classes()


# ---------------------------------------------------------------------------------------------
# 6. prepare-merge and the names in parts/


@pytest.mark.parametrize("entry", ["../victim/precious.tar", "train/shard-r00000-000000.tar", "PRECIOUS"])
def test_merge_touches_nothing_a_part_names_but_its_own_shards(prepared, tmp_path, capsys, entry) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.tar").write_bytes(b"precious")
    entry = str(victim / "precious.tar") if entry == "PRECIOUS" else entry  # absolute

    def edit(part: dict) -> None:  # node 1 claims a file that is not one of its shards
        part["splits"]["train"].update(shards=[entry], shard_samples=[3], samples=3)

    folder = copy_with(prepared["nodes"], tmp_path / "data", edit, "parts/node-00001.json")
    assert nodes.main([str(folder)]) == 2
    err = capsys.readouterr().err
    assert (victim / "precious.tar").read_bytes() == b"precious" and not (victim / "sizes.json").exists()
    assert "node-00001.json" in err and repr(entry) in err and "Traceback" not in err
    assert not (folder / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------
# 7. --overwrite


def test_overwrite_leaves_a_folder_that_is_not_a_dataset_of_ours(prepared, stdlib_files, tmp_path, capsys) -> None:
    project = tmp_path / "project"
    (project / "test").mkdir(parents=True)
    (project / "test" / "test_app.py").write_text("def test_app(): pass\n")
    (project / "README.md").write_text("my project")
    tokenizer = str(prepared["single"] / "tokenizer")

    def argv(output: Path) -> list[str]:
        return [*map(str, stdlib_files[:3]), "--output", str(output), "--tokenizer", tokenizer, *FLAGS, "--overwrite"]

    assert prepare.main(argv(project)) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and str(project) in err and "Traceback" not in err
    assert (project / "test" / "test_app.py").is_file() and not (project / "manifest.json").exists()
    # a dataset of ours (its manifest), or the shards an interrupted run left, are replaced
    ours = tmp_path / "ours"
    shutil.copytree(prepared["single"], ours)
    assert prepare.main(argv(ours)) == 0
    interrupted = tmp_path / "interrupted"
    (interrupted / "train").mkdir(parents=True)
    (interrupted / "train" / "shard-000000.tar").write_bytes(b"")
    assert prepare.main(argv(interrupted)) == 0


# ---------------------------------------------------------------------------------------------
# 14. one line and exit 2, not a traceback


@pytest.mark.parametrize("config", ["unknown", "custom"])
def test_an_init_from_config_transformers_cannot_load(prepared, tmp_path, capsys, isolated_env, config) -> None:
    from pretrain.train import main

    init = tmp_path / "init"
    init.mkdir()
    model = {"model_type": "no-such-model"}
    if config == "custom":
        model = {"model_type": "mine", "auto_map": {"AutoConfig": "configuration_mine.MineConfig"}}
    (init / "config.json").write_text(json.dumps(model))
    argv = ["--config", "gpt-tiny", "--data", str(prepared["single"]), "--output-dir", str(tmp_path / "run")]
    assert main([*argv, "--init-from", str(init)]) == 2
    err = capsys.readouterr().err
    assert "--init-from" in err and str(init / "config.json") in err and "Traceback" not in err


@pytest.mark.parametrize("damage", ["no settings", "no inputs", "splits not objects", "no input paths"])
def test_a_malformed_part_is_reported_not_a_traceback(prepared, tmp_path, capsys, damage) -> None:
    def edit(part: dict) -> None:
        if damage == "no settings":
            del part["settings"]
        elif damage == "no inputs":
            del part["inputs"]
        elif damage == "splits not objects":
            part["splits"]["train"] = 5
        else:
            del part["settings"]["input_paths"]

    folder = tmp_path / "data"
    shutil.copytree(prepared["nodes"], folder)
    for rank in (0, 1) if damage == "no input paths" else (1,):  # settings must agree between nodes
        copy_with(folder, tmp_path / f"scratch{rank}", edit, f"parts/node-{rank:05d}.json")
        shutil.copy(tmp_path / f"scratch{rank}" / "parts" / f"node-{rank:05d}.json", folder / "parts")
    assert nodes.main([str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prepare-merge: error:") and "parts" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_export_to_a_file_is_refused(tmp_path, capsys) -> None:
    from pretrain.cli.export import main

    target = tmp_path / "model.bin"
    target.write_bytes(b"not a folder")
    for output in (target, target / "sub"):
        assert main(["--checkpoint", str(tmp_path / "run"), "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert "--output" in err and str(target) in err and "Traceback" not in err
    assert target.read_bytes() == b"not a folder"
