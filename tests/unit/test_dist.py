from __future__ import annotations

from scaletrain.dist import detect_launch, expand_nodelist


def test_single():
    info = detect_launch({}, [])
    assert info.launcher == "single" and info.world_size == 1 and info.rank == 0


def test_torchrun():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "h0",
           "MASTER_PORT": "1234", "TORCHELASTIC_RUN_ID": "x"}
    info = detect_launch(env)
    assert (info.launcher, info.rank, info.local_rank, info.world_size, info.master_addr, info.master_port) == (
        "torchrun", 3, 1, 4, "h0", 1234)


def test_deepspeed_launcher_passes_local_rank():
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    info = detect_launch(env, ["train.py", "--local_rank=1", "--ds", "x.json"])
    assert info.launcher == "deepspeed" and info.local_rank == 1


def test_slurm_srun_tasks():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[01-04]",
           "SLURM_NTASKS_PER_NODE": "2(x4)", "SLURM_JOB_ID": "77"}
    info = detect_launch(env)
    assert info.launcher == "slurm" and info.rank == 5 and info.world_size == 8
    assert info.master_addr == "gpu01" and info.local_world_size == 2


def test_torchrun_inside_slurm_wins():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
           "TORCHELASTIC_RUN_ID": "j"}
    assert detect_launch(env).launcher == "torchrun"


def test_expand_nodelist():
    assert expand_nodelist("node[01-03,07],gpu5") == ["node01", "node02", "node03", "node07", "gpu5"]
    assert expand_nodelist("localhost") == ["localhost"]
