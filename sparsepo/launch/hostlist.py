"""Slurm's two compact strings, parsed in pure Python (no `scontrol` needed): node lists and tasks per node.

    expand_hostlist("node[01-03,07],gpu-a[1-2]")  # ['node01', 'node02', 'node03', 'node07', 'gpu-a1', 'gpu-a2']
    parse_tasks_per_node("2(x3),1")                # [2, 2, 2, 1]

Used by `sparsepo.launch.environ` (the launcher-environment parser) and by launcher/env.sh through
``python -m sparsepo.launch``.
"""

from __future__ import annotations

import re

from sparsepo.launch.errors import TopologyError

__all__ = ["expand_hostlist", "parse_tasks_per_node"]


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise TopologyError(f"hostlist {text!r}: nested '[' is not valid Slurm hostlist syntax")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise TopologyError(f"hostlist {text!r}: ']' without a matching '['")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise TopologyError(f"hostlist {text!r}: '[' without a matching ']'")
    parts.append("".join(cur))
    return parts


def _expand_range_set(body: str, whole: str) -> list[str]:
    out: list[str] = []
    for item in body.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise TopologyError(f"hostlist {whole!r}: {item!r} inside [...] is not N or N-M")
        lo_s, hi_s = m.group(1), m.group(2)
        if hi_s is None:
            out.append(lo_s)
            continue
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise TopologyError(f"hostlist {whole!r}: range {item!r} runs backwards ({hi} < {lo})")
        width = len(lo_s)  # Slurm pads to the width of the lower bound: [01-10] -> 01..10
        out.extend(str(i).zfill(width) for i in range(lo, hi + 1))
    return out


def expand_hostlist(hostlist: str) -> list[str]:
    """Expand a Slurm hostlist (what ``scontrol show hostnames`` does), in pure Python.

    ``node[1-3,5]`` -> node1 node2 node3 node5; ``a1,b[01-02]`` -> a1 b01 b02; zero padding follows
    the lower bound (``n[001-003]``); several bracket groups multiply out
    (``r[1-2]n[1-2]`` -> r1n1 r1n2 r2n1 r2n2). Order is kept, duplicates are kept.
    """
    hosts: list[str] = []
    text = (hostlist or "").strip()
    if not text:
        return hosts
    for entry in _split_top_level(text):
        entry = entry.strip()
        if not entry:
            continue
        pieces = re.split(r"(\[[^\]]*\])", entry)
        names = [""]
        for piece in pieces:
            if not piece:
                continue
            if piece.startswith("["):
                options = _expand_range_set(piece[1:-1], hostlist)
                names = [n + o for n in names for o in options]
            else:
                names = [n + piece for n in names]
        hosts.extend(names)
    return hosts


def parse_tasks_per_node(spec: str) -> list[int]:
    """Slurm's SLURM_TASKS_PER_NODE: ``2(x3),1`` -> [2, 2, 2, 1]; ``4`` -> [4]."""
    out: list[int] = []
    text = (spec or "").strip()
    if not text:
        return out
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise TopologyError(f"SLURM_TASKS_PER_NODE={spec!r}: {item!r} is not N or N(xM)")
        out.extend([int(m.group(1))] * int(m.group(2) or 1))
    return out

