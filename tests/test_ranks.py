"""The job's layout from torchrun's or SLURM's variables (launch/ranks.py). A real 2-task job started with SLURM's
variables alone trains one model: tests/test_train.py (stop_after_first_record starts its ranks that way)."""
import pytest

from launch.ranks import SLURM_PORT_BASE, LaunchError, Ranks, export_ranks, resolve, tasks_on_node

SRUN = {"SLURM_JOB_ID": "1234", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1", "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "node7"}


def test_a_bare_srun_task_gets_its_rank_world_size_and_a_port_of_its_job():
    env = dict(SRUN)
    assert export_ranks(env) == Ranks(3, 1, 4, 2, "node7", SLURM_PORT_BASE + 1234)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"], env["MASTER_ADDR"],
            env["MASTER_PORT"]) == ("3", "4", "1", "2", "node7", str(SLURM_PORT_BASE + 1234))


def test_torchrun_variables_win_over_slurm_ones_and_a_given_address_over_the_node_list():
    env = {**SRUN, "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "MASTER_ADDR": "10.0.0.2", "MASTER_PORT": "29500"}
    assert resolve(env) == Ranks(5, 1, 8, 4, "10.0.0.2", 29500)
    assert resolve({**SRUN, "MASTER_ADDR": "10.0.0.9"}).master_addr == "10.0.0.9"


def test_no_launcher_or_the_batch_script_itself_is_one_process_and_the_environment_is_left_alone():
    env = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_ID"}  # sbatch's script: not a task of a step
    assert export_ranks(env) == Ranks(0, 0, 1, 1, None, None) and "RANK" not in env
    assert resolve({}) == Ranks(0, 0, 1, 1, None, None)


def test_compressed_task_lists_are_read_per_node():
    assert [tasks_on_node("4(x2),3", n) for n in range(3)] == [4, 4, 3]


@pytest.mark.parametrize("env, names", [
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "rank 2"),
    ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "MASTER_PORT"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
    ({**SRUN, "SLURM_TASKS_PER_NODE": "2(x2"}, "SLURM_TASKS_PER_NODE"),
    ({**SRUN, "SLURM_NODEID": "2"}, "SLURM_NODEID=2"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_LOCALID"}, "SLURM_LOCALID"),
    ({k: v for k, v in SRUN.items() if k != "SLURM_JOB_NODELIST"}, "MASTER_ADDR"),
])
def test_missing_or_contradicting_variables_are_one_line_naming_them(env, names):
    with pytest.raises(LaunchError, match=names.replace("(", r"\(").replace("[", r"\[")) as e:
        resolve(env)
    assert "\n" not in str(e.value)


def test_a_compressed_node_list_without_scontrol_asks_for_master_addr(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(LaunchError, match="SLURM_JOB_NODELIST='node\\[1-2\\]' needs scontrol.*MASTER_ADDR"):
        resolve({**SRUN, "SLURM_JOB_NODELIST": "node[1-2]"})


def test_the_cli_refuses_a_contradicting_launch_in_one_line(monkeypatch, capsys):
    from launch import cli
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(["train", "configs/demo.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("elbodiff train: RANK / WORLD_SIZE: rank 3") and err.count("\n") == 1
