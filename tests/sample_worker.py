"""One rank under torchrun (tests/test_eval_sample.py): the bits/dim of step 1 of a run, summed over the ranks,
then `elbodiff sample` in the same process group.

    sample_worker.py STORE RUN VAL_SHARDS BPD_JSON '["sample", ...]'

The command's arguments come as one JSON list: torchrun would take an option of theirs such as --n for an
abbreviation of one of its own.
"""
import json
import sys
from pathlib import Path

from eval import bpd, sample
from eval.checkpoints import load_network
from launch.cli import exit_now, main
from trainer.store import open_store

store, run, val, out, argv = sys.argv[1:]
rank, world, device = sample.distributed()
result = bpd.bits_per_dim(load_network(open_store(store), run, 1), val, rank=rank, world=world, batch_size=5)
if rank == 0:
    Path(out).write_text(json.dumps({**result, "world": world}))
exit_now(main(json.loads(argv)))
