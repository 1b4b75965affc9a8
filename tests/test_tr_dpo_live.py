"""TR-DPO with a live reference group (issue 24): the moving reference lives on the policy ranks as
1/P slices, is mixed there and streamed, parameter by parameter, to the stages that hold it.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_tr_dpo_live.py

The pieces by hand (slices, routing, the mix over slices = the mix of the whole tensor, bit for bit);
the transport (a policy process and a 2-stage group over a real bridge: each stage ends up with exactly
the mixed parameters it holds, a tied head with the embedding); end to end, a live run (2 policy ranks
+ a 2-stage group) logs inline mode's losses step for step, and its checkpointed slices put together
are inline's moved reference.
"""

import math
import multiprocessing as mp

import pytest
import torch

from conftest import free_port, read_scalars, run_training
from sparsepo.follow import mix_
from sparsepo.reference_role.follow_live import FollowError, Shadow, routes, shard_bounds, syncs_before

BASE = ("method.name=dpo", "optim.lr=5e-3", "optim.schedule=constant", "optim.warmup_steps=0",
        "train.micro_batch_size=8", "train.max_steps=6", "reference.sync_alpha=0.5", "reference.sync_steps=2",
        "checkpoint.every_steps=6", "eval.fraction=0.25", "eval.every_steps=3")
LIVE = ("reference.mode=live", "topology.reference_ranks=2", "topology.pipeline_stages=2")


@pytest.mark.unit
def test_slices_cover_each_parameter_once():
    for numel in (1, 2, 5, 7, 12, 13):
        for world in (1, 2, 3, 4, 5):
            bounds = [shard_bounds(numel, r, world) for r in range(world)]
            covered = [i for lo, hi, _ in bounds for i in range(lo, hi)]
            assert covered == list(range(numel)), (numel, world, bounds)
            assert all(hi - lo <= part and part == math.ceil(numel / world) for lo, hi, part in bounds)
    assert syncs_before(4, 2) and syncs_before(2, 2) and not syncs_before(1, 2) and not syncs_before(0, 1)


@pytest.mark.unit
def test_the_mix_over_slices_is_the_mix_of_the_whole_tensor_bit_for_bit():
    """Three ranks' slices, mixed with α = 0.3 twice and put together, equal `mix_` on the whole
    tensor (the update inline mode applies); a state dict comes back on its own rank, and the three
    re-cut for 1, 2 or 4 ranks (a resume on another world size) put together are the same tensor."""
    g = torch.Generator().manual_seed(0)
    ref = {"w": torch.randn(7, 5, generator=g), "b": torch.randn(3, generator=g)}
    shapes = {k: tuple(v.shape) for k, v in ref.items()}
    shadows = [Shadow(shapes, rank=r, world=3, dtype=torch.float32) for r in range(3)]
    for s in shadows:
        s.fill(list(ref.items()) + [("tied.alias", torch.zeros(1))])  # a name it does not hold: skipped
    whole = {k: v.clone() for k, v in ref.items()}
    for _ in range(2):
        policy = {k: torch.randn(v.shape, generator=g) for k, v in ref.items()}
        for name, value in policy.items():
            mix_(whole[name], value, 0.3)
            for s in shadows:
                s.mix_(name, value, 0.3)
    for name in ref:
        together = torch.cat([s.shards[name] for s in shadows]).view(shapes[name])
        assert torch.equal(together, whole[name])
    restored = Shadow(shapes, rank=1, world=3, dtype=torch.float32)
    restored.load_state_dict(shadows[1].state_dict())
    assert all(torch.equal(restored.shards[n], shadows[1].shards[n]) for n in ref)
    with pytest.raises(FollowError, match="rank 0 of 3 policy ranks, this is rank 0 of 2"):
        Shadow(shapes, rank=0, world=2, dtype=torch.float32).load_state_dict(shadows[0].state_dict())
    for world in (1, 2, 4):  # another number of policy ranks: the three slices re-cut
        recut = [Shadow(shapes, rank=r, world=world, dtype=torch.float32) for r in range(world)]
        for s in recut:
            s.load_resharded([t.state_dict() for t in shadows])
        for name in ref:
            assert torch.equal(torch.cat([s.shards[name] for s in recut]).view(shapes[name]), whole[name])
    with pytest.raises(FollowError, match="not ranks 0..1 of 2"):
        recut[0].load_resharded([shadows[0].state_dict(), shadows[2].state_dict()])
    with pytest.raises(FollowError, match=r"has no \['w'\]"):
        Shadow(shapes, rank=0, world=1, dtype=torch.float32).fill([("b", ref["b"])])


@pytest.mark.unit
def test_routes_send_each_parameter_to_the_stages_that_hold_it():
    shapes = {"embed.weight": (10, 4), "layers.0.w": (4, 4), "norm.weight": (4,)}
    manifests = {0: {"embed.weight": (10, 4), "layers.0.w": (4, 4)},
                 1: {"norm.weight": (4,), "head.weight": (10, 4)}}
    got = routes(manifests, shapes, {"head.weight": "embed.weight"})
    assert got == {"embed.weight": [(0, "embed.weight"), (1, "head.weight")], "layers.0.w": [(0, "layers.0.w")],
                   "norm.weight": [(1, "norm.weight")]}
    with pytest.raises(FollowError, match="stage 1 holds 'head.weight', which the policy has not"):
        routes(manifests, shapes, {})
    with pytest.raises(FollowError, match=r"shape \(4, 5\), the policy's is \(4, 4\)"):
        routes({0: {**manifests[0], "layers.0.w": (4, 5)}, 1: manifests[1]}, shapes, {"head.weight": "embed.weight"})
    with pytest.raises(FollowError, match=r"\['norm.weight'\] \(1 parameter\(s\)\) are on no reference stage"):
        routes({0: manifests[0]}, shapes, {})


class _Policy:
    """What `PolicyFollower` asks of the policy engine, over a plain model (one rank: nothing gathered)."""

    def __init__(self, model):
        self.module = model

    def gathered_parameters(self):
        return ((n, p.data) for n, p in self.module.named_parameters())


def _transport_rank(rank: int, port: int, model_dir: str, parts: list, alpha: float, out):
    import os

    from sparsepo import bridge as br
    from sparsepo.reference.stage_loader import StageLoader
    from sparsepo.reference_role.follow_live import GroupFollower, PolicyFollower, Shadow, routes

    os.environ["OMP_NUM_THREADS"] = "1"
    bridge = br.connect("127.0.0.1", port, rank, 3, timeout_s=60)
    loader = StageLoader(model_dir)
    try:
        if rank == 0:  # the policy: its own model, moved by hand, and the shadow from the reference
            from sparsepo.models import load_frozen_model

            policy = load_frozen_model(model_dir)
            with torch.no_grad():
                for p in policy.parameters():
                    p.add_(torch.ones_like(p))
            shapes = {n: tuple(p.shape) for n, p in policy.named_parameters()}
            tied = {"lm_head.weight": "model.embed_tokens.weight"} if policy.config.tie_word_embeddings else {}
            manifests = {s: br.recv(bridge, 1 + s).records[0] for s in (0, 1)}
            shadow = Shadow(shapes, rank=0, world=1, dtype=torch.float32)
            shadow.fill(loader.named_tensors())
            follower = PolicyFollower(shadow, bridge=bridge, routes=routes(manifests, shapes, tied),
                                      stage_ranks={0: [1], 1: [2]}, device="cpu", window=2, start=0, total=5,
                                      sync_steps=1)
            follower.follow(_Policy(policy), alpha, step=1)
            follower.outbox.flush()
            out.put((0, {n: s.numpy().copy() for n, s in shadow.shards.items()}))  # by value
        else:
            stage = rank - 1
            block = loader.build(parts[stage], parts[stage + 1])
            follower = GroupFollower(bridge, block=block, src=0, start=0, sync_steps=1)
            follower.announce()
            assert follower.due(1) and not follower.due(0)
            follower.receive(1)
            out.put((rank, {n: p.detach().numpy().copy() for n, p in block.named_reference.items()}))
    except Exception as e:  # noqa: BLE001 - reported to the test
        out.put((rank, f"{type(e).__name__}: {e}"))


@pytest.mark.integration
def test_a_two_stage_group_receives_exactly_the_mixed_weights(tiny_world):
    """Policy (1 rank) + 2 stages over a real bridge: α = 0.5 between the reference (the model on disk)
    and the policy (the same model + 1): each stage holds 0.5·(θ+1) + 0.5·θ for its parameters, bit for
    bit what the policy's shadow holds, and nothing else."""
    from sparsepo.reference.partition import stage_parts
    from sparsepo.reference.stage_loader import StageLoader

    loader = StageLoader(str(tiny_world.sft_dir))
    parts = stage_parts(loader.num_layers, 2)
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_transport_rank, args=(r, port, str(tiny_world.sft_dir), parts, 0.5, out))
             for r in range(3)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    errors = {r: v for r, v in results.items() if isinstance(v, str)}
    assert not errors, errors
    shadow = {n: torch.from_numpy(v) for n, v in results[0].items()}
    reference = dict(loader.named_tensors())
    tied = loader.config.tie_word_embeddings
    for stage, rank in ((0, 1), (1, 2)):
        held = {n: torch.from_numpy(v) for n, v in results[rank].items()}
        assert held and set(held) == set(loader.build(parts[stage], parts[stage + 1]).named_reference)
        for name, value in held.items():
            own = "model.embed_tokens.weight" if tied and name == "lm_head.weight" else name
            want = reference[own].clone()
            mix_(want, reference[own] + 1, 0.5)
            assert torch.equal(value, want), name
            assert torch.equal(value.reshape(-1), shadow[own]), name


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.parametrize("group", [pytest.param(LIVE, marks=pytest.mark.slow), pytest.param(("reference.mode=live", "topology.reference_ranks=2",
                                                       "topology.pipeline_stages=1"), marks=pytest.mark.slow)],
                         ids=["2-stages", "2-replicas"])
def test_live_tr_dpo_logs_inline_losses_and_checkpoints_the_same_reference(tiny_world, tmp_path, group):
    """α = 0.5 every 2 steps over 6 steps of 16 pairs, 2 policy ranks: live (a 2-stage group; slow: two
    1-stage replicas, each serving one policy rank and receiving the weights) = inline, step for step
    (steps 3 and 5 are scored by the moved reference; steps 4-6 are the 48 training pairs' second
    epoch, rescored, not reused), and so are the evaluations of the 16 held-out pairs at step 3 (by the
    reference of the sync at step 2) and step 6 (by the one moved at the last step, sent for it); the
    live run's two checkpointed slices put together are inline's moved reference; nothing went into
    the training reference cache."""
    inline, live = tmp_path / "inline", tmp_path / "live"
    run_training(tiny_world, inline, *BASE, "reference.mode=inline", nproc=2)
    proc = run_training(tiny_world, live, *BASE, *group, nproc=4)
    want, got = read_scalars(inline, "train/loss"), read_scalars(live, "train/loss")
    assert sorted(got) == sorted(want) == list(range(1, 7))
    for step in want:
        assert abs(got[step] - want[step]) < 1e-6, (step, got, want)
    want, got = read_scalars(inline, "eval/rewards/margins"), read_scalars(live, "eval/rewards/margins")
    assert sorted(got) == sorted(want) == [3, 6]
    for step in want:
        assert abs(got[step] - want[step]) < 1e-6, (step, got, want)
    assert "TR-DPO live" in proc.stdout + proc.stderr
    assert not list((live / "ref_cache").glob("*"))
    tag = inline / "checkpoints" / "step-00000006"
    moved = torch.load(tag / "reference-rank0.pt", weights_only=True)
    slices = [torch.load(live / "checkpoints" / "step-00000006" / f"reference-rank{r}.pt", weights_only=True)
              for r in (0, 1)]
    for name, value in slices[0]["shards"].items():
        together = torch.cat([s["shards"][name] for s in slices]).view(moved[name].shape)
        assert torch.equal(together, moved[name]), name


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("policy_ranks", [2, 1])
def test_a_resumed_live_run_sends_the_checkpoints_reference_and_continues_the_curve(tiny_world, tmp_path,
                                                                                     policy_ranks):
    """α = 0.5 every step, 4 steps on 2 policy ranks, a checkpoint at step 2: resumed from it (on 2
    policy ranks, or on 1 — the two slices re-cut), the policy sends the group its checkpointed
    reference before step 3 (else the group would score with the starting one), and steps 3 and 4
    log the uninterrupted live run's losses."""
    soft = (*LIVE, "method.name=dpo", "optim.lr=5e-3", "optim.schedule=constant", "optim.warmup_steps=0",
            "train.micro_batch_size=8", "reference.sync_alpha=0.5", "reference.sync_steps=1",
            "checkpoint.every_steps=2")
    full, part = tmp_path / "full", tmp_path / "part"
    run_training(tiny_world, full, *soft, "train.max_steps=4", nproc=4)
    run_training(tiny_world, part, *soft, "train.max_steps=2", nproc=4)
    proc = run_training(tiny_world, part, *soft, "train.max_steps=4", f"train.micro_batch_size={16 // policy_ranks}",
                        nproc=2 + policy_ranks, resume="auto")  # the same global batch of 16 pairs
    assert "the checkpoint's reference (step 2) sent" in proc.stdout + proc.stderr
    want, got = read_scalars(full, "train/loss"), read_scalars(part, "train/loss")
    for step in (3, 4):
        assert abs(got[step] - want[step]) < (1e-6 if policy_ranks == 2 else 1e-5), (step, got, want)


@pytest.mark.integration
@pytest.mark.distributed
@pytest.mark.slow  # default-time budget (2026-12-05: the default run was 18 min on an idle box), as the test above
def test_live_spo_follows_like_inline(tiny_world, tmp_path):
    """SPO (KL on the policy's own samples) with α = 0.5 every step, 1 policy rank + a 2-stage group:
    each step's samples are scored by the reference after the syncs before it, as inline mode scores
    them when they are drawn — the moved weights reach both stages through the inbox that carries the
    policy's requests, in order; loss and sample KL equal inline's step for step."""
    spo = ("method.name=spo", "generation.max_new_tokens=8", "optim.lr=1e-2", "optim.schedule=constant",
           "optim.warmup_steps=0", "train.micro_batch_size=2", "train.max_steps=3", "method.kl_support=union",
           "reference.sync_alpha=0.5", "reference.sync_steps=1")
    inline, live = tmp_path / "inline", tmp_path / "live"
    run_training(tiny_world, inline, *spo, "reference.mode=inline")
    run_training(tiny_world, live, *spo, *LIVE[:1], "topology.reference_ranks=2", "topology.pipeline_stages=2",
                 nproc=3)
    for tag in ("train/loss", "train/sample_kl"):
        want, got = read_scalars(inline, tag), read_scalars(live, tag)
        assert sorted(got) == sorted(want) == [1, 2, 3], tag
        for step in want:
            assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), (tag, step, got, want)
