"""Launcher environments shared by the sparsepo.launch tests (plain data, no tests here)."""

from sparsepo.config import TopologyConfig


def cfg(ref=0, stages=1, placement="last"):
    return TopologyConfig(reference_ranks=ref, pipeline_stages=stages, placement=placement)


TORCHRUN = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1",
            "GROUP_WORLD_SIZE": "2", "ROLE_RANK": "5", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400",
            "TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCHELASTIC_RESTART_COUNT": "0"}
DEEPSPEED = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
             "CROSS_RANK": "0", "CROSS_SIZE": "1", "LOCAL_SIZE": "4"}
SLURM = {"SLURM_JOB_ID": "123457", "SLURM_PROCID": "6", "SLURM_NTASKS": "8", "SLURM_LOCALID": "2",
         "SLURM_NODEID": "1", "SLURM_NNODES": "2", "SLURM_TASKS_PER_NODE": "4(x2)",
         "SLURM_JOB_NODELIST": "node[1-2]", "SLURMD_NODENAME": "node2"}
OMPI = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}


def slurm_env(rank, world=8, per_node=4, job=123457, nodelist="node[1-2]"):
    return {"SLURM_JOB_ID": str(job), "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(world),
            "SLURM_LOCALID": str(rank % per_node), "SLURM_NODEID": str(rank // per_node),
            "SLURM_NNODES": str(world // per_node), "SLURM_TASKS_PER_NODE": f"{per_node}(x{world // per_node})",
            "SLURM_JOB_NODELIST": nodelist, "PATH": "/usr/bin"}

