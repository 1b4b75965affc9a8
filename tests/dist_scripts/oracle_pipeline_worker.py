"""Worker for tests/test_live_sepo.py: SePO's oracle pair as two pipelines over the same ranks.

Launched with `torchrun --nproc_per_node N` (world = stages x replicas). Replica r scores batches
r, r + R, ...; middle stages pass None. Each last-stage rank writes out/oracle_rank{rank}.pt =
{batch index: {"oracle_scores": (2B,T), "sent": the selection records it would send}}.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from sparsepo.data.batching import collate_pairs
from sparsepo.engine.dist import shutdown
from sparsepo.losses import SePOParams
from sparsepo.reference.oracle import read_manifest
from sparsepo.reference_role.oracle_live import OraclePipelines, selection_records


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--oracle-dir", required=True, help="a directory with oracle.json")
    ap.add_argument("--batches", required=True, help="torch.save'd list of row lists (collate_pairs input)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--stages", type=int, required=True)
    ap.add_argument("--eos", type=int, required=True)
    args = ap.parse_args()

    pipes = OraclePipelines.build(read_manifest(args.oracle_dir), num_stages=args.stages)
    batches = [collate_pairs(rows, pad_id=0) for rows in torch.load(args.batches)]
    r, n_rep = pipes.replica_index, pipes.oracle.num_replicas
    got = {}
    for rnd in range(len(batches) // n_rep):
        index = rnd * n_rep + r
        batch = batches[index]
        ro = pipes.score(batch if pipes.needs_batch else None)
        if pipes.is_last_stage:
            records = ro.to_records(batch.response_mask)
            got[index] = {"oracle_scores": ro.oracle_scores,
                          "sent": selection_records(SePOParams(min_response_tokens=0), batch, records, args.eos)}
        else:
            assert ro is None
    if pipes.is_last_stage:
        torch.save(got, os.path.join(args.out, f"oracle_rank{dist.get_rank()}.pt"))
    shutdown(0)  # the gloo exit crash fix (docs/field_notes.md, "Exit crash"): barrier, destroy, flush, hard exit


if __name__ == "__main__":
    main()
