"""Evaluation during training: held-out pairs (`eval.path`, `eval.split` of data.path, or `eval.fraction`
of the training data) scored by the policy as it is at that step, with the training loss (`pair_loss.forward_loss`)
and the reference outputs of the run's own source kind (cache: an eval cache beside the training
one; inline: the same scorer; live: the same eval cache, written by the reference group first). Metrics
under TRL's names with `eval/` in front, at `eval.every_steps` and after the last step: `eval/loss`,
`eval/rewards/{chosen,rejected,accuracies,margins}`, `eval/logps/{chosen,rejected}`, each the mean over
every eval pair (not a mean of batch means), and `eval/entropy`, `eval/mean_token_accuracy`,
`eval/logits/{chosen,rejected}` (the last two where the policy holds full logits, model.logits_chunk=0),
each pooled over every eval response token (`metrics.token_sums`; TRL averages its eval batches' values).

Under ZeRO-3 every rank must run the same number of forwards (each gathers the partitions): the
pairs are dealt in rounds of eval.batch_size per rank, and a rank whose share of the last round is
empty scores pair 0 with weight 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from sparsepo.metrics import pair_values, reduce_mean, token_sums
from sparsepo.schedule import eval_due


def eval_rounds(num_rows: int, batch_size: int, rank: int, world_size: int) -> list[tuple[list[int], int]]:
    """This rank's (rows, how many of them count) per round; the same number of rounds on every rank."""
    per_round = batch_size * world_size
    rounds = []
    for start in range(0, num_rows, per_round):
        mine = list(range(start + rank * batch_size, min(start + (rank + 1) * batch_size, num_rows)))
        rounds.append((mine, len(mine)) if mine else ([0], 0))
    return rounds


@dataclass
class Evaluator:
    batch: Callable[[list[int]], Any]
    """Eval dataset rows -> a PairBatch (`RunData.batch` of the eval data)."""
    num_rows: int
    source: Any
    """The reference source for the eval rows (`reference_role.sources.open_eval_source`)."""
    batch_size: int
    every_steps: int
    rank: int = 0
    world_size: int = 1
    device: Any = "cpu"

    def due(self, step: int, total: int) -> bool:
        return eval_due(step, total, self.every_steps)

    @torch.no_grad()
    def run(self, loss_step: Callable, module: torch.nn.Module | None = None) -> dict[str, float]:
        """`loss_step(batch, ref) -> (LossOutput, PairForward)` (the forward with its `stats`); `module` is
        put in eval mode meanwhile. Collective: every rank calls it. Returns the means over all eval pairs
        (the token statistics: over all eval tokens), on every rank."""
        training = module.training if module is not None else False
        if module is not None:
            module.eval()
        try:
            sums: dict[str, torch.Tensor] = {}
            for rows, real in eval_rounds(self.num_rows, self.batch_size, self.rank, self.world_size):
                batch = self.batch(rows).to(self.device)
                out, fwd = loss_step(batch, self.source.get(batch))
                b = len(rows)
                values = pair_values(out.losses, out.chosen_rewards, out.rejected_rewards, fwd.seq_logps[:b],
                                     fwd.seq_logps[b:])
                weight = (torch.arange(b, device=out.losses.device) < real).to(torch.float64)
                for k, v in {**values, "pairs": torch.ones_like(weight)}.items():
                    sums[k] = sums.get(k, 0.0) + (v.to(torch.float64) * weight).sum()
                rows_weight = torch.cat([weight, weight])[:, None]  # chosen rows, then rejected
                for k, (num, den) in token_sums(fwd, batch.input_ids, batch.response_mask * rows_weight).items():
                    sums[f"tokens:{k}"] = sums.get(f"tokens:{k}", 0.0) + num
                    sums[f"count:{k}"] = sums.get(f"count:{k}", 0.0) + den
        finally:
            if module is not None and training:
                module.train()
        keys = sorted(sums)
        host = reduce_mean(dict(zip(keys, torch.stack([sums[k] for k in keys]).cpu().tolist())))
        pairs = host.pop("pairs")
        counts = {k[len("count:"):]: host.pop(k) for k in keys if k.startswith("count:")}
        tokens = {k[len("tokens:"):]: host.pop(k) for k in keys if k.startswith("tokens:")}
        return {**{k: v / pairs for k, v in host.items()}, **{k: v / counts[k] if counts[k] else 0.0 for k, v in tokens.items()}}
