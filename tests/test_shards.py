import io
import json
import os

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data import shards, writer
from data.reader import iterate_shard
from data.stream import Stream, StreamConfig
from launch.cli import main


def jpeg(array, mode=None):
    buf = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def picture(seed, h=40, w=56):
    rng = np.random.default_rng(seed)
    return (rng.random((h, w, 3)) * 255).astype(np.uint8)


def imagenet_like(root, good_per_class=3):
    """Class folders with plain JPEGs plus one file of each kind of bad input."""
    for c, wnid in enumerate(["n01440764", "n01443537", "n01484850"]):
        folder = root / wnid
        folder.mkdir(parents=True)
        for i in range(good_per_class):
            (folder / f"{wnid}_{i}.JPEG").write_bytes(jpeg(picture(10 * c + i)))
    bad = root / "n01440764"
    (bad / "cmyk.JPEG").write_bytes(jpeg(picture(100), "CMYK"))
    (bad / "grey.JPEG").write_bytes(jpeg(picture(101)[..., 0]))
    (bad / "rgba.png").write_bytes(png(Image.fromarray(picture(102)).convert("RGBA")))
    (bad / "grey16.png").write_bytes(png(Image.fromarray((picture(103)[..., 0].astype(np.uint16) * 257))))
    (bad / "dot.png").write_bytes(png(Image.new("RGB", (1, 1), (1, 2, 3))))
    (bad / "corrupt.JPEG").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (bad / "truncated.JPEG").write_bytes(jpeg(picture(104, 200, 200))[:6000])
    (bad / "notes.txt").write_text("not an image")
    (root / "stray.JPEG").write_bytes(jpeg(picture(105)))  # outside any class folder: no label


def read_all(out):
    index = writer.load_index(str(out))
    samples = [s for entry in index["shards"] for s in iterate_shard(str(out / entry["name"]))]
    return index, samples


def test_bad_inputs_are_converted_or_skipped_and_counted_by_reason(tmp_path):
    imagenet_like(tmp_path / "train")
    index = shards.write(str(tmp_path / "train"), str(tmp_path / "out"), resolution=16, samples_per_shard=4)
    assert index["complete"]
    assert index["skipped"] == {"corrupt": 1, "no_label": 1, "not_an_image": 1, "too_small": 1, "truncated": 1}
    assert index["converted"] == {"16bit": 1, "alpha": 1, "cmyk": 1, "greyscale": 1}
    assert index["num_samples"] == 9 + 4
    assert index["classes"] == ["n01440764", "n01443537", "n01484850"]
    assert index["class_counts"] == {"0": 7, "1": 3, "2": 3}
    _, samples = read_all(tmp_path / "out")
    assert len(samples) == 13
    for s in samples:
        image = Image.open(io.BytesIO(s["jpg"]))
        assert image.mode == "RGB" and image.size == (16, 16)
    assert "corrupt" in shards.report(index) and "16bit 1" in shards.report(index)


def test_sixteen_bit_greyscale_is_rescaled_not_clipped(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    grey = np.full((20, 20), 32768, np.uint16)  # mid grey in 16 bits; clipping would give white
    (tmp_path / "src" / "a" / "g.png").write_bytes(png(Image.fromarray(grey)))
    shards.write(str(tmp_path / "src"), str(tmp_path / "out"), resolution=8, fmt="png")
    _, [sample] = read_all(tmp_path / "out")
    assert np.all(np.asarray(Image.open(io.BytesIO(sample["png"]))) == 128)


def test_centre_crop_follows_the_adm_convention(tmp_path):
    source = Image.fromarray(picture(7, 300, 520))
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.png").write_bytes(png(source))
    shards.write(str(tmp_path / "src"), str(tmp_path / "out"), resolution=64, fmt="png")
    _, [sample] = read_all(tmp_path / "out")
    # by hand: 520x300 -> BOX 260x150 -> BOX 130x75 (75 < 128 stops) -> BICUBIC 111x64 -> centre 64 columns
    halved = source.resize((260, 150), Image.BOX).resize((130, 75), Image.BOX)
    expected = halved.resize((111, 64), Image.BICUBIC).crop((23, 0, 87, 64))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(sample["png"]))), np.asarray(expected))


def test_keep_resolution_stores_plain_jpeg_bytes_unchanged(tmp_path):
    imagenet_like(tmp_path / "train", good_per_class=1)
    index = shards.write(str(tmp_path / "train"), str(tmp_path / "out"), resolution=0)
    assert index["resolution"] == 0
    originals = {(tmp_path / "train" / "n01443537" / "n01443537_0.JPEG").read_bytes()}
    _, samples = read_all(tmp_path / "out")
    assert originals <= {s.get("jpg") for s in samples}
    assert sum("png" not in s and "jpg" not in s for s in samples) == 0


def test_validation_layout_with_a_label_file(tmp_path):
    val = tmp_path / "val"
    val.mkdir()
    lines = ["ImageId,PredictionString"]
    for i, wnid in enumerate(["n02", "n01", "n02", "n03"]):
        name = f"ILSVRC2012_val_{i + 1:08d}"
        (val / f"{name}.JPEG").write_bytes(jpeg(picture(i)))
        lines.append(f"{name},{wnid} 1 2 3 4")
    (val / "ILSVRC2012_val_00000099.JPEG").write_bytes(jpeg(picture(9)))  # no line in the label file
    (tmp_path / "labels.csv").write_text("\n".join(lines))
    index = shards.write(str(val), str(tmp_path / "out"), resolution=16, labels=str(tmp_path / "labels.csv"))
    assert index["classes"] == ["n01", "n02", "n03"]
    assert index["class_counts"] == {"0": 1, "1": 2, "2": 1}
    assert index["skipped"] == {"no_label": 1}


def test_same_seed_gives_the_same_shards_serial_or_parallel_and_classes_mixed_across_shards(tmp_path):
    imagenet_like(tmp_path / "train", good_per_class=4)
    serial = shards.write(str(tmp_path / "train"), str(tmp_path / "a"), resolution=16, samples_per_shard=5)
    parallel = shards.write(str(tmp_path / "train"), str(tmp_path / "b"), resolution=16, samples_per_shard=5,
                            processes=2)
    assert [s["sha256"] for s in serial["shards"]] == [s["sha256"] for s in parallel["shards"]]
    assert all(len(s["class_counts"]) > 1 for s in serial["shards"])


def test_rerun_keeps_finished_shards_and_rewrites_missing_or_damaged_ones(tmp_path):
    imagenet_like(tmp_path / "train", good_per_class=4)
    out = tmp_path / "out"
    first = shards.write(str(tmp_path / "train"), str(out), resolution=16, samples_per_shard=4)
    names = [s["name"] for s in first["shards"]]
    (out / names[0]).unlink()
    (out / names[1]).write_bytes(b"damaged")
    kept = {n: os.stat(out / n).st_mtime_ns for n in names[2:]}
    second = shards.write(str(tmp_path / "train"), str(out), resolution=16, samples_per_shard=4)
    assert second == first
    assert {n: os.stat(out / n).st_mtime_ns for n in names[2:]} == kept


def test_interrupted_run_leaves_only_whole_shards_and_resumes(tmp_path, monkeypatch):
    imagenet_like(tmp_path / "train", good_per_class=4)
    src, out = str(tmp_path / "train"), tmp_path / "out"
    real, made = shards.make_image_shard, []

    def dying_on_third(payload, tar_path):
        if len(made) == 2:
            with wds.TarWriter(tar_path, encoder=False) as tar:  # part of a shard is on disk when the run dies
                tar.write({"__key__": "x", "cls": b"0"})
            raise KeyboardInterrupt
        made.append(payload[3])
        return real(payload, tar_path)

    monkeypatch.setattr(shards, "make_image_shard", dying_on_third)
    with pytest.raises(KeyboardInterrupt):
        shards.write(src, str(out), resolution=16, samples_per_shard=4)
    partial = json.loads((out / "index.json").read_text())
    assert not partial["complete"] and len(partial["shards"]) == 2
    finished = [s["name"] for s in partial["shards"]] + [s["members"]["name"] for s in partial["shards"]]
    assert sorted(p.name for p in out.iterdir()) == sorted(finished + ["index.json"])

    made.clear()
    monkeypatch.setattr(shards, "make_image_shard", lambda payload, tar_path: made.append(1) or real(payload, tar_path))
    index = shards.write(src, str(out), resolution=16, samples_per_shard=4)
    assert index["complete"] and len(made) == len(index["shards"]) - 2


def test_existing_output_with_other_settings_is_refused_unless_overwrite(tmp_path):
    imagenet_like(tmp_path / "train", good_per_class=1)
    src, out = str(tmp_path / "train"), str(tmp_path / "out")
    shards.write(src, out, resolution=16)
    with pytest.raises(ValueError, match=r"resolution=16 \(asked 32\).*--overwrite"):
        shards.write(src, out, resolution=32)
    with pytest.raises(ValueError, match="format='jpg' \\(asked 'png'\\)"):
        shards.write(src, out, resolution=16, fmt="png")
    assert shards.write(src, out, resolution=32, overwrite=True)["resolution"] == 32


def test_missing_source_is_an_error_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        shards.write(str(tmp_path / "nowhere"), str(tmp_path / "out"), resolution=16)


def test_command_line_writes_shards_the_stream_reads(tmp_path, capsys):
    imagenet_like(tmp_path / "train", good_per_class=2)
    assert main(["shards", str(tmp_path / "train"), str(tmp_path / "out"), "--resolution", "16",
                 "--samples-per-shard", "3", "--processes", "1"]) == 0
    assert "skipped:" in capsys.readouterr().out
    batch = next(iter(Stream(StreamConfig(index=str(tmp_path / "out"), batch_size=5, num_workers=0))))
    assert batch["x"].shape == (5, 3, 16, 16)
