"""Rank, local rank, world size and rendezvous address from whatever started this process.

torchrun, `accelerate launch` and our Kubernetes pods set PyTorch's variables (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT). A bare `srun python -m launch.cli ...` sets only SLURM's
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, ...): without a translation every task would see world size 1 and
train its own model into the same run folder. `export_ranks` reads either, checks them, and writes PyTorch's
variables into the environment before any process group exists, so the trainer, the evaluation service and
accelerate all read one description of the job.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import MutableMapping

# MASTER_PORT of a bare srun job that names none: one port per job id, so two jobs sharing a node do not collide
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000


class LaunchError(ValueError):
    """The launcher's variables are missing or contradict each other."""


@dataclass(frozen=True)
class Ranks:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str | None  # None for a single process, which needs no rendezvous
    master_port: int | None


def _int(env: MutableMapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None:
        if default is None:
            raise LaunchError(f"environment variable {name} is not set")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r}: expected an integer") from None


def tasks_on_node(tasks_per_node: str, node: int) -> int:
    """This node's entry of SLURM_TASKS_PER_NODE, a compressed list such as '4(x2),3' (4, 4, 3)."""
    counts = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise LaunchError(f"environment variable SLURM_TASKS_PER_NODE={tasks_per_node!r}: expected a list "
                              "such as '4(x2),3'")
        counts += [int(m[1])] * int(m[2] or 1)
    if not 0 <= node < len(counts):
        raise LaunchError(f"SLURM_NODEID={node} but SLURM_TASKS_PER_NODE={tasks_per_node!r} lists {len(counts)} "
                          "nodes")
    return counts[node]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list ('gpu[003-004],cpu1' -> 'gpu003'), expanded by scontrol when it is
    compressed (SLURM's own grammar, not re-implemented here)."""
    if not re.search(r"[\[,]", nodelist):
        return nodelist
    if shutil.which("scontrol") is None:
        raise LaunchError(f"SLURM_JOB_NODELIST={nodelist!r} needs scontrol to expand; set MASTER_ADDR instead")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.split():
        raise LaunchError(f"scontrol show hostnames {nodelist!r} failed ({out.stderr.strip()}); set MASTER_ADDR")
    return out.stdout.split()[0]


def resolve(env: MutableMapping[str, str]) -> Ranks:
    """The job's layout from PyTorch's variables, else from SLURM's; a single process when there are neither."""
    if "RANK" in env or "WORLD_SIZE" in env:
        world = _int(env, "WORLD_SIZE")
        rank, local = _int(env, "RANK"), _int(env, "LOCAL_RANK", 0)
        local_world = _int(env, "LOCAL_WORLD_SIZE", world)
        source = "RANK / WORLD_SIZE"
    elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:  # a task of an srun step, not the batch script
        world, rank = _int(env, "SLURM_NTASKS"), _int(env, "SLURM_PROCID")
        local = _int(env, "SLURM_LOCALID")
        local_world = tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""),
                                    _int(env, "SLURM_NODEID"))
        source = "SLURM_PROCID / SLURM_NTASKS"
    else:
        return Ranks(0, 0, 1, 1, None, None)
    if world < 1 or not 0 <= rank < world or not 0 <= local < local_world <= world:
        raise LaunchError(f"{source}: rank {rank}, local rank {local}, world size {world} and {local_world} ranks on "
                          "this node are inconsistent (0 <= local rank < ranks on the node <= world size, "
                          "0 <= rank < world size)")
    if world == 1:
        return Ranks(0, 0, 1, 1, None, None)
    addr = env.get("MASTER_ADDR")
    if addr is None and source.startswith("SLURM"):
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise LaunchError("neither MASTER_ADDR nor SLURM_JOB_NODELIST is set: set MASTER_ADDR to rank 0's host")
        addr = first_host(nodelist)
    if addr is None:
        raise LaunchError(f"WORLD_SIZE={world} but MASTER_ADDR is not set: set it to rank 0's host")
    if "MASTER_PORT" in env:
        port = _int(env, "MASTER_PORT")
    elif source.startswith("SLURM"):
        port = SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID") % SLURM_PORT_SPAN
    else:
        raise LaunchError(f"WORLD_SIZE={world} but MASTER_PORT is not set: set it to a free port on {addr}")
    if not 0 < port < 65536:
        raise LaunchError(f"MASTER_PORT={port}: expected a port number, 1-65535")
    return Ranks(rank, local, world, local_world, addr, port)


def export_ranks(env: MutableMapping[str, str] = os.environ) -> Ranks:
    """resolve(env), written back as PyTorch's variables (which accelerate and torch.distributed read)."""
    ranks = resolve(env)
    if ranks.world_size == 1:  # nothing to rendezvous with; accelerate takes a set RANK for a distributed job
        return ranks
    env.update(RANK=str(ranks.rank), LOCAL_RANK=str(ranks.local_rank), WORLD_SIZE=str(ranks.world_size),
               LOCAL_WORLD_SIZE=str(ranks.local_world_size))
    if ranks.master_addr is not None:
        env.update(MASTER_ADDR=ranks.master_addr, MASTER_PORT=str(ranks.master_port))
    return ranks
