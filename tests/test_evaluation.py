"""Evaluation during training (`sparsepo.evaluation`): the eval metrics are the method's loss and
TRL's pair statistics applied by hand to the held-out pairs, mean over pairs (not over batches),
with every rank running the same number of forwards."""

import math

import pytest
import torch

from sparsepo.data.batching import collate_pairs
from sparsepo.evaluation import Evaluator, eval_rounds
from sparsepo.losses import DPOParams, get_method
from sparsepo.pair_loss import forward_loss
from sparsepo.logprobs.head import Head
from sparsepo.reference_role.sources import InlineSource

BETA = 0.5


def tiny_llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def rows(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):  # lengths differ, so padding is exercised
        p, c, r = (int(x) for x in torch.randint(1, 6, (3,), generator=g))
        ids = lambda k: torch.randint(2, 40, (k,), generator=g).tolist()  # noqa: E731
        out.append({"example_id": f"e{i}", "prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)})
    return out


def seq_logp(model, prompt, response):
    """log π(response | prompt) from one unpadded forward of prompt + response."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logps[len(prompt) - 1:].sum())


def token_stats_by_hand(policy, data):
    """TRL's token statistics pooled over every response token of `data`: entropy (chosen and rejected
    rows), mean_token_accuracy (chosen), logits/chosen|rejected (the mean logit at each predicting position)."""
    ent = hits = 0.0
    logit_sums, counts = [0.0, 0.0], [0, 0]
    with torch.no_grad():
        for row in data:
            p = row["prompt_ids"]
            for side, key in enumerate(("chosen_ids", "rejected_ids")):
                ids = torch.tensor([p + row[key]])
                logits = policy(input_ids=ids).logits[0, len(p) - 1:-1]
                logp = logits.log_softmax(-1)
                ent -= float((logp.exp() * logp).sum())
                logit_sums[side] += float(logits.mean(-1).sum())
                counts[side] += len(row[key])
                hits += float((logits.argmax(-1) == ids[0, len(p):]).sum()) if side == 0 else 0.0
    return {"entropy": ent / sum(counts), "mean_token_accuracy": hits / counts[0],
            "logits/chosen": logit_sums[0] / counts[0], "logits/rejected": logit_sums[1] / counts[1]}


def by_hand(policy, ref, data):
    """DPO: r = β(log πθ − log πref); loss = −log σ(r_w − r_l); TRL's statistics, mean over pairs (the
    token statistics: over tokens)."""
    stats = []
    for row in data:
        pw, pl = (seq_logp(policy, row["prompt_ids"], row[k]) for k in ("chosen_ids", "rejected_ids"))
        rw, rl = (seq_logp(ref, row["prompt_ids"], row[k]) for k in ("chosen_ids", "rejected_ids"))
        cw, cl = BETA * (pw - rw), BETA * (pl - rl)
        stats.append({"loss": math.log1p(math.exp(-(cw - cl))), "rewards/chosen": cw, "rewards/rejected": cl,
                      "rewards/accuracies": float(cw > cl), "rewards/margins": cw - cl, "logps/chosen": pw,
                      "logps/rejected": pl})
    return {**{k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}, **token_stats_by_hand(policy, data)}


def test_rounds_deal_every_pair_once_and_pad_with_weight_zero():
    for n, bs, world in [(5, 2, 2), (7, 3, 2), (4, 1, 3), (1, 4, 4), (9, 2, 1)]:
        per_rank = [eval_rounds(n, bs, r, world) for r in range(world)]
        assert len({len(rounds) for rounds in per_rank}) == 1  # ZeRO-3: the same number of forwards
        counted = sorted(i for rounds in per_rank for rows, real in rounds for i in rows[:real])
        assert counted == list(range(n)), (n, bs, world)
        assert all(rows == [0] for rounds in per_rank for rows, real in rounds if real == 0)


@pytest.mark.parametrize("rank", [0, 1])
def test_eval_metrics_equal_the_loss_applied_by_hand(rank):
    policy, ref, data = tiny_llama(0), tiny_llama(1), rows()
    spec, params = get_method("dpo"), DPOParams(beta=BETA)
    source = InlineSource(Head.for_model(ref, 0), spec.reference_outputs, topk=4)
    # rank 0 of 2 holds pairs 0, 1 | 4 (batches of 2 and 1: a mean of batch means would differ);
    # rank 1 holds 2, 3 and then pads its empty last round with pair 0 at weight 0
    mine = [i for rows_, real in eval_rounds(len(data), 2, rank, 2) for i in rows_[:real]]
    ev = Evaluator(batch=lambda idx: collate_pairs([data[i] for i in idx], pad_id=0), num_rows=len(data),
                   source=source, batch_size=2, every_steps=0, rank=rank, world_size=2)
    policy.train()
    got = ev.run(lambda batch, r: forward_loss(Head.for_model(policy, 0), batch, r, spec, params, eos_id=1,
                                                stats=True)[:2], policy)
    assert policy.training  # put back
    want = by_hand(policy.eval(), ref, [data[i] for i in mine])
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-5), k


def test_due_every_n_steps_and_after_the_last():
    ev = Evaluator(batch=None, num_rows=1, source=None, batch_size=1, every_steps=3)
    assert [s for s in range(1, 8) if ev.due(s, 7)] == [3, 6, 7]
    ev.every_steps = 0
    assert [s for s in range(1, 8) if ev.due(s, 7)] == [7]
