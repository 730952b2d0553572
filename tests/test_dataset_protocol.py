"""The one interface of the data objects a run reads (data_pipelines/dataset.py)."""

from __future__ import annotations


def test_every_data_object_declares_what_it_is(prepared_stdlib, tmp_path):
    """Prepared folders, sources and image folders satisfy the one DataSet protocol that readers use
    without probing (chat, seq_len, fetch, sources, origin, to_json)."""
    from PIL import Image

    from data_pipelines.dataset import DataSet, ShardedDataSet
    from data_pipelines.image.folder import ImageFolder
    from data_pipelines.loader import TextShards
    from data_pipelines.sources import SourceSpec, open_sources

    text = TextShards(prepared_stdlib)
    for cls in ("a", "b"):
        (tmp_path / "folder" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "folder" / cls / f"{i}.jpg")
    folder = ImageFolder(tmp_path / "folder")
    sources = open_sources("text", [SourceSpec(urls=str(prepared_stdlib), name="stdlib", key="data.sources[0]")])
    for data in (text, folder, sources):
        assert isinstance(data, DataSet), type(data)
        assert data.origin("val") and isinstance(data.chat, bool)
    assert isinstance(text, ShardedDataSet) and isinstance(sources, ShardedDataSet)
    assert text.seq_len == 64 and sources.seq_len == 64 and folder.seq_len is None
    assert text.sources is None and text.to_json() is None and sources.sources and sources.to_json()
