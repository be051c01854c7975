import os

import pytest
import torch

from data import demo

# Tests run two at a time on small machines; one thread each keeps timings stable and avoids oversubscription.
torch.set_num_threads(int(os.environ.get("ELBODIFF_TEST_THREADS", "1")))


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small demo shard set (96 images in 3 shards) for the training tests."""
    out = tmp_path_factory.mktemp("data")
    demo.write(str(out), num_images=96, samples_per_shard=32)
    return out
