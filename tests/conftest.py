import os

import pytest
import torch

# Tests run two at a time on small machines; one thread each keeps timings stable and avoids oversubscription.
torch.set_num_threads(int(os.environ.get("ELBODIFF_TEST_THREADS", "1")))


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)
