"""Member tables: the writer's map of each image in its shard, and reading through it against reading the tar."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from data import demo, members, reader, shards
from data.stream import Stream, StreamConfig


def jpeg_source(root, n=36):
    for i in range(n):
        folder = root / f"n{i % 3:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        image, _ = demo.draw(1, i)
        Image.fromarray(np.kron(image, np.ones((2, 2, 1), np.uint8))).save(folder / f"{i}.JPEG", quality=90)
    return str(root)


@pytest.fixture(params=["jpg", "png"])
def written(request, tmp_path):
    """Shards from the writer: JPEG (`elbodiff shards`) or PNG (the demo set)."""
    out = tmp_path / "out"
    if request.param == "jpg":
        shards.write(jpeg_source(tmp_path / "src"), str(out), resolution=32, samples_per_shard=10)
    else:
        demo.write(str(out), num_images=36, samples_per_shard=10)
    return out


def without_tables(out):
    """An index of the same shards that lists no member tables: read through `data.tar`."""
    index = json.loads((out / "index.json").read_text())
    for record in index["shards"]:
        record.pop("members")
    (out / "plain.json").write_text(json.dumps(index))
    return str(out / "plain.json")


def as_pairs(samples):
    """(image bytes, label) or the reason, whatever the reader's member types."""
    out = []
    for s in samples:
        if isinstance(s, str):
            out.append(s)
        else:
            ext = "jpg" if "jpg" in s else "png"
            out.append((bytes(s[ext]), int(s["cls"])))
    return out


def test_every_image_shard_has_a_table_that_locates_its_images_and_labels(written):
    index = json.loads((written / "index.json").read_text())
    for record in index["shards"]:
        table = members.load(str(written / record["members"]["name"]))
        data = (written / record["name"]).read_bytes()
        samples = list(reader.iterate_shard(str(written / record["name"])))
        assert len(table) == len(samples) == record["count"]
        for (offset, size, label, image_format), sample in zip(table.tolist(), samples):
            assert data[offset:offset + size] == sample[members.FORMATS[image_format]]
            assert label == int(sample["cls"])


def test_flipped_batches_are_the_same_with_and_without_member_tables(written):
    config = dict(batch_size=8, num_workers=0, shuffle_buffer=7, seed=5, dtype="uint8")
    with_tables = Stream(StreamConfig(index=str(written), **config))
    plain = Stream(StreamConfig(index=without_tables(written), **config))
    assert all(with_tables.tables) and not any(plain.tables)
    for a, b, _ in zip(with_tables, plain, range(12)):  # more than one epoch
        for key in ("x", "label", "index"):
            assert torch.equal(a[key], b[key])


@pytest.mark.parametrize("how", ["mapped", "streamed"])
def test_a_truncated_shard_reads_the_same_samples_and_reasons_with_and_without_its_table(written, how):
    """Local shards are memory-mapped, others (here pipe:) read in chunks: both against `data.tar`."""
    index = json.loads((written / "index.json").read_text())
    name = index["shards"][1]["name"]
    table = members.load(str(written / index["shards"][1]["members"]["name"]))
    data = (written / name).read_bytes()
    (written / name).write_bytes(data[:int(table[6, 0]) + 10])  # cut inside the 7th image
    starts = np.cumsum([0] + [s["count"] for s in index["shards"]])
    urls, tables = reader.shard_urls(str(written), index, "" if how == "mapped" else f"pipe:cat {written}/{{name}}")
    read = [as_pairs(reader.ShardReader(urls, starts, t).get(i) for i in range(starts[-1])) for t in (tables, None)]
    assert read[0] == read[1]
    owed = read[0][starts[1]:starts[2]]
    assert owed[6:] == ["truncated_shard"] * 4 and all(isinstance(s, tuple) for s in owed[:6])


def test_a_damaged_table_is_rewritten_by_a_rerun_and_refused_by_the_reader(tmp_path):
    src, out = jpeg_source(tmp_path / "src"), tmp_path / "out"
    first = shards.write(src, str(out), resolution=32, samples_per_shard=10)
    table = out / first["shards"][0]["members"]["name"]
    good = table.read_bytes()
    table.write_bytes(good[:-8])

    def read_epoch():
        for _ in zip(Stream(StreamConfig(index=str(out), batch_size=4, num_workers=0)), range(9)):
            pass

    with pytest.raises(ValueError, match=f"{table.name} is not a member table: .*not a whole number"):
        read_epoch()
    assert shards.write(src, str(out), resolution=32, samples_per_shard=10) == first
    assert table.read_bytes() == good
    table.unlink()
    with pytest.raises(FileNotFoundError, match=table.name):
        read_epoch()
