"""The launcher-variable half of launcher/launch.sh and launcher/env.sh, so a shell never parses them.

    python -m sparsepo.launch --print-env            # shell lines for this process; launch.sh evals them
    python -m sparsepo.launch --tasks-on-node SPEC N # tasks on node N of a Slurm tasks-per-node list

``--print-env`` prints ``sparsepo_mode=slurm|mpi|local`` (`launch_mode`); for slurm / mpi ``export``
lines with `torch_dist_env` (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR,
MASTER_PORT); for local the address and port of the launch the shell will start itself
(``sparsepo_master_addr``, ``sparsepo_master_port``: MASTER_* when set, else 127.0.0.1 and a free
port). Exit 64 (launch.sh's code for bad launcher input) when the variables make no sense.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Mapping

from sparsepo.launch.environ import DEFAULT_MASTER_ADDR, launch_mode, torch_dist_env
from sparsepo.launch.hostlist import parse_tasks_per_node
from sparsepo.launch.ports import free_port
from sparsepo.launch.topology import TopologyError

EXIT_BAD_LAUNCH = 64


def shell_env(env: Mapping[str, str]) -> list[str]:
    """The lines `--print-env` prints, for ``env``."""
    mode = launch_mode(env)
    lines = [f"sparsepo_mode={mode}"]
    if mode == "local":
        port = str(env.get("MASTER_PORT", "")).strip() or str(free_port())
        addr = str(env.get("MASTER_ADDR", "")).strip() or DEFAULT_MASTER_ADDR
        lines += [f"sparsepo_master_addr={shlex.quote(addr)}", f"sparsepo_master_port={shlex.quote(port)}"]
    else:
        lines += [f"export {k}={shlex.quote(v)}" for k, v in torch_dist_env(env).items()]
    return lines


def tasks_on_node(spec: str, node: int) -> int:
    counts = parse_tasks_per_node(spec)
    if not 0 <= node < len(counts):
        raise TopologyError(f"tasks per node {spec!r} lists {len(counts)} node(s); node {node} is not one of them")
    return counts[node]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparsepo.launch", description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--print-env", action="store_true", help="shell lines for this process (launch.sh evals them)")
    g.add_argument("--tasks-on-node", nargs=2, metavar=("SPEC", "NODE"), help="e.g. '2(x3),1' 3 -> 1")
    a = p.parse_args(argv)
    try:
        if a.print_env:
            print("\n".join(shell_env(os.environ)))
        else:
            print(tasks_on_node(a.tasks_on_node[0], int(a.tasks_on_node[1])))
    except (TopologyError, ValueError) as e:
        print(f"sparsepo.launch: {e}", file=sys.stderr)
        return EXIT_BAD_LAUNCH
    return 0


if __name__ == "__main__":
    sys.exit(main())
