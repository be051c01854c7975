"""Starting 2-rank training runs on CPU for the tests: under torchrun, or the way srun starts ranks (environment only)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from s3server import free_port

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo.yaml"
# The demo config with a network small enough that a step takes milliseconds; dropout off so that one process on
# the global batch must match two ranks; the adaptive sampler, whose bin statistics are all-reduced and whose table
# is part of the resume state. Its class embedding has 11 rows and its position embeddings one, so FSDP2 shards
# some parameters unevenly and leaves rank 1 empty-handed on others.
TINY = ["objective.importance=adaptive", "data.batch_size=4", "data.shuffle_buffer=16",
        "network.overrides.channels=[16,32]", "network.overrides.transformer_channels=32",
        "network.overrides.transformer_depth=1", "network.overrides.head_channels=16",
        "network.overrides.emb_channels=32", "network.overrides.norm_groups=4", "network.overrides.label_dropout=0.0",
        "log_every_images=8", "sample_steps=4", "optimizer.warmup_images=16"]
GLOBAL_BATCH = 8  # two ranks x data.batch_size
# DeepSpeed compiles its shared-memory communication op on first use (about 40 s); the cache lives in the workspace
EXTENSIONS = str(ROOT / ".torch_extensions")


def environment(**extra: str) -> dict:
    """The launched ranks' environment, read when they start: fixtures (S3 credentials) may have changed it."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TORCH_EXTENSIONS_DIR": EXTENSIONS,
            **extra}


def train_argv(*overrides: str) -> list[str]:
    return ["-m", "launch.cli", "train", str(DEMO), *overrides]


def torchrun(argv, log, timeout=400) -> int:
    """torchrun with 2 CPU ranks running `argv` (a script or `-m module` and its arguments); output to `log`."""
    with open(log, "w") as f:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               *argv], cwd=ROOT, env=environment(), stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode


def stop_after_first_record(overrides, store: Path, log_prefix: Path, timeout=200) -> list[int]:
    """Two ranks started the way a bare `srun` starts them (SLURM's variables alone: launch/ranks.py derives the
    rest), SIGTERM to rank 1 once the run has logged its first record; returns both exit codes."""
    port, procs, logs = free_port(), [], []
    for rank in range(2):
        env = environment(SLURM_JOB_ID="7", SLURM_STEP_ID="0", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
                          SLURM_NTASKS="2", SLURM_NODEID="0", SLURM_TASKS_PER_NODE="2",
                          SLURM_JOB_NODELIST="127.0.0.1", MASTER_PORT=str(port))
        logs.append(open(f"{log_prefix}-{rank}.log", "w"))
        procs.append(subprocess.Popen([sys.executable, *train_argv(*overrides)], cwd=ROOT, env=env, stdout=logs[-1],
                                      stderr=subprocess.STDOUT))
    log_file = store / "demo" / "logs" / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not log_file.exists() and time.monotonic() < deadline and procs[0].poll() is None:
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGTERM)
    codes = [proc.wait(timeout=timeout) for proc in procs]
    for f in logs:
        f.close()
    assert log_file.exists(), Path(f"{log_prefix}-0.log").read_text()[-3000:]
    return codes


def metrics(store) -> list[dict]:
    return [json.loads(line) for line in (Path(store) / "demo" / "logs" / "metrics.jsonl").read_text().splitlines()]
