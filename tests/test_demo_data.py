import numpy as np

from data import demo
from data.stream import Stream, StreamConfig
from launch.cli import main


def test_demo_set_is_deterministic_and_balanced(tmp_path):
    a = demo.write(str(tmp_path / "a"), num_images=200, samples_per_shard=64)
    b = demo.write(str(tmp_path / "b"), num_images=200, samples_per_shard=64)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert a["class_counts"] == {str(c): 20 for c in range(10)}
    assert [s["count"] for s in a["shards"]] == [64, 64, 64, 8]
    assert all(len(s["class_counts"]) == 10 for s in a["shards"][:3])  # shuffled across shards


def test_demo_classes_differ_in_shape_not_colour():
    # Per class, the fraction of pixels that differ from the corner (background) colour: shapes cover a
    # smaller, class-specific share; mean colours are alike across classes.
    coverage, colour = [], []
    for label in range(10):
        images = [demo.draw(0, label + 10 * j)[0].astype(float) for j in range(30)]
        coverage.append(np.mean([np.any(x != x[0, 0], axis=2).mean() for x in images]))
        colour.append(np.mean([x.mean() for x in images]))
    assert np.ptp(coverage) > 0.2
    assert all(0.05 < c < 0.8 for c in coverage)
    assert np.ptp(colour) < 40
    assert all(demo.draw(0, i)[0].shape == (32, 32, 3) for i in range(10))


def test_demo_data_command_writes_shards_the_stream_reads(tmp_path, capsys):
    assert main(["demo-data", str(tmp_path), "--num-images", "120"]) == 0
    assert "120 samples" in capsys.readouterr().out
    batch = next(iter(Stream(StreamConfig(index=str(tmp_path), batch_size=16, num_workers=0))))
    assert batch["x"].shape == (16, 3, 32, 32)
    assert set(batch["label"].tolist()) <= set(range(10))
