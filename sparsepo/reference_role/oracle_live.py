"""Live SePO: the pipeline-parallel reference group holds the oracle pair and sends the selection.

    pipes = OraclePipelines.build(oracle_manifest(cfg), num_stages=S, precision="fp32")
    ro = pipes.score(batch)                     # last stages: oracle_scores (2B,T); other stages: None
    sent = selection_records(params, batch, ro.to_records(batch.response_mask), eos_id)

Design: **two pipelines over the same stage ranks**, one per model of the pair (the DPO-trained
oracle and its reference, `oracle.json`). Each is a plain `PipelineScorer` (eval-only DeepSpeed
``PipelineModule``, each rank loading only its own stage's tensors with `StageLoader`, which also
runs `check_live_supported`), built over the same reference world, so stage s of replica r holds
stage s of both models and every rank calls both ``eval_batch`` es once per round, in the same
order (oracle first). Why not one pipeline whose stages run both models side by side: the two
models need not share a depth or a partition (`oracle.json` may point at any reference of the
policy's tokenizer), and the existing stage items, loader, partition and scoring function are reused
unchanged; the cost is a second (barrier + p2p) pipeline pass per round, small next to the forward.

The last stage gets each model's token log-probs from `reference.scoring.score` (through
`ScoreFn`, as `OraclePair.token_scores` does on one process), so r_t = log π_oracle(y_t) −
log π_oracle_ref(y_t) is the same number as in cache and inline modes; it keeps r_t for the
write-through cache (keyed exactly like cache mode's) and sends the policy only the key tokens,
picked by `losses.sepo.sepo_selection` — the same function the loss applies to r_t in the other
modes — bit-packed: per pair, ceil(|yw|/8) + ceil(|yl|/8) bytes plus the record's framing
(`ReferenceOutputs.to_records`). Measured (`bridge.recv`'s count, tests/test_live_sepo.py): at 64-token
responses ~80 bytes per pair (16 of them the bits, the rest its id and pickle framing) plus ~1.4 KB
per message for torch.save's container, against ~1 KB per pair for float32 r_t; the tiny demo's live
run (8 pairs per message) received 249 bytes/pair in all (the policy logs it: `LiveSource.finish`).
"""

from __future__ import annotations

import torch

from sparsepo.reference.outputs import ReferenceOutputs


class OraclePipelines:
    """The oracle pair as two pipelines over the same ranks, with `PipelineScorer`'s who-is-who and a
    `score(batch)` that serves oracle_scores (a collective, like `PipelineScorer.score`)."""

    features = None  # no SAE: the server's key and log lines read it

    def __init__(self, oracle, reference):
        if (oracle.stage_id, oracle.replica_index) != (reference.stage_id, reference.replica_index):
            raise RuntimeError(f"SePO oracle pipelines disagree on this rank's place: oracle stage {oracle.stage_id} "
                               f"replica {oracle.replica_index}, oracle reference stage {reference.stage_id} "
                               f"replica {reference.replica_index}")
        self.oracle, self.reference = oracle, reference

    @classmethod
    def build(cls, manifest, *, num_stages: int, precision: str = "fp32", micro_batches: int = 1,
              chunk: int = 0) -> "OraclePipelines":
        """Both pipelines; ``chunk``: the lean head path of the last stage (``model.logits_chunk``)."""
        from sparsepo.engine.pipeline import PipelineScorer

        pipes = [PipelineScorer.from_pretrained(path, num_stages=num_stages, topk=None, precision=precision,
                                                micro_batches=micro_batches, outputs=("token_logps",), chunk=chunk)
                 for path in (manifest.oracle, manifest.reference)]
        return cls(*pipes)

    @property
    def stage_id(self) -> int:
        return self.oracle.stage_id

    @property
    def replica_index(self) -> int:
        return self.oracle.replica_index

    @property
    def is_last_stage(self) -> bool:
        return self.oracle.is_last_stage

    @property
    def needs_batch(self) -> bool:
        return self.oracle.needs_batch

    def last_stage_global_ranks(self) -> list[int]:
        return self.oracle.last_stage_global_ranks()

    @torch.no_grad()
    def score(self, batch) -> ReferenceOutputs | None:
        """r_t for every row of the batch (2B,T), zero outside the response, on the last stage."""
        got = [pipe.score(batch) for pipe in (self.oracle, self.reference)]
        if got[0] is None:
            return None
        return ReferenceOutputs(example_ids=list(batch.example_ids),
                                oracle_scores=got[0].token_logps - got[1].token_logps)


def sepo_params(params):
    """The SePO hyper-parameters of a run's `method.params` (SePO alone or one part of a combination)."""
    from sparsepo.losses import SePOParams

    if isinstance(params, SePOParams):
        return params
    for _, _, part in getattr(params, "parts", ()):
        if isinstance(part, SePOParams):
            return part
    raise ValueError(f"method params {type(params).__name__} hold no SePO part: live oracle selection needs one")


def selection_records(params, batch, records: list[dict], eos_id: int) -> list[dict]:
    """What the group sends for a batch scored (or read from the cache) as oracle_scores records:
    per pair {"oracle_selection": [chosen bits, rejected bits]}, selected by `sepo_selection`."""
    from sparsepo.losses import sepo_selection
    from sparsepo.losses.inputs import eos_positions

    mask = batch.response_mask.cpu()
    b = mask.shape[0] // 2
    scores = ReferenceOutputs.from_records(batch.example_ids, records, mask).oracle_scores
    eos = eos_positions(batch.input_ids.cpu(), mask, eos_id)
    sel_w, sel_l = sepo_selection(sepo_params(params), scores[:b], scores[b:], mask[:b], mask[b:], eos[:b], eos[b:])
    return ReferenceOutputs(example_ids=list(batch.example_ids),
                            oracle_selection=torch.cat([sel_w, sel_l])).to_records(mask)
