"""One launch, every process: launcher environment -> topology -> each role's environment.

* `sparsepo.launch.environ`: `LaunchEnv`, the one parser of launcher environments (deepspeed,
  torchrun, srun, mpirun, a lone process), and `torch_dist_env` for torch.distributed.
* `sparsepo.launch.hostlist`: Slurm node lists and tasks-per-node strings.
* `sparsepo.launch.ports`: every port sparsepo picks, and the one rule behind them (`free_port`).
* `sparsepo.launch.topology`: global rank -> role (policy / reference stage), pure arithmetic.
* `sparsepo.launch.process`: each process's rewritten environment for its role's world (`plan`).
* ``python -m sparsepo.launch --print-env``: the same for launcher/launch.sh, as shell lines.

Stdlib only: importing this package never imports torch or deepspeed.
"""

from sparsepo.launch.environ import LaunchEnv, launch_mode, master_port_from, torch_dist_env
from sparsepo.launch.hostlist import expand_hostlist, parse_tasks_per_node
from sparsepo.launch.ports import DEFAULT_MASTER_PORT, free_port
from sparsepo.launch.process import ProcessPlan, plan
from sparsepo.launch.topology import Role, Topology, TopologyError

__all__ = ["DEFAULT_MASTER_PORT", "LaunchEnv", "ProcessPlan", "Role", "Topology", "TopologyError",
           "expand_hostlist", "free_port", "launch_mode", "master_port_from", "parse_tasks_per_node", "plan",
           "torch_dist_env"]
