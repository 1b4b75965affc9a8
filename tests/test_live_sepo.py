"""Live SePO: the pipeline-parallel reference group holds the oracle pair (two pipelines over the same
stage ranks, `sparsepo.reference_role.oracle_live`) and sends each batch's key tokens, bit-packed.

Unit: the selection the group sends gives exactly cache mode's loss and gradient (which reaches the
selected tokens only); bit packing round-trips and refuses a wrong length; the bytes per pair on the
bridge; the policy side of a live run loads and runs no oracle. Distributed: the oracle pipelines
(2 stages; 2 stages x 2 replicas) equal the single-process `OraclePair` and its selection; a live run
(1 policy rank + a 2-stage group) has cache mode's loss at every step.

    OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu .venv/bin/python -m pytest tests/test_live_sepo.py -q
"""

from __future__ import annotations

import json
import queue
import random
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from sparsepo import bridge as br
from sparsepo.data.batching import collate_pairs
from sparsepo.logprobs.head import PlainHead
from sparsepo.losses import METHODS, SePOParams, sepo_loss, sepo_selection
from sparsepo.losses.inputs import build_loss_inputs, eos_positions
from sparsepo.reference.oracle import OraclePair
from sparsepo.reference_role.oracle_live import selection_records
from sparsepo.reference.outputs import MisalignedOutputs, ReferenceOutputs, pack_bits, unpack_bits

from conftest import RECIPE, REPO, free_port, read_scalars, train_command, train_env
from test_pipeline_reference import VOCAB, random_rows, tiny_llama

SPEC = METHODS["sepo"]
EOS = 7
PARAMS = SePOParams(min_response_tokens=0)
WORKER = REPO / "tests" / "dist_scripts" / "oracle_pipeline_worker.py"


def sepo_batch(seed: int, pairs: int = 3, max_len: int = 12):
    """A collated batch of random pairs, some responses ending in eos."""
    rng = random.Random(seed)
    rows = random_rows(rng, pairs, max_len, f"s{seed}")
    for row in rows[::2]:
        row["chosen_ids"] = row["chosen_ids"] + [EOS]
        row["rejected_ids"] = row["rejected_ids"] + [EOS]
    return rows, collate_pairs(rows, pad_id=0)


def batch_scores(batch, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch.input_ids.shape, generator=g) * batch.response_mask


def policy_forward(batch, seed: int):
    g = torch.Generator().manual_seed(seed + 100)
    tokens = (-2 * torch.rand(batch.input_ids.shape, generator=g, dtype=torch.float64) - 0.1).requires_grad_(True)
    fwd = SimpleNamespace(token_logps=tokens, seq_logps=(tokens * batch.response_mask).sum(-1))
    return fwd, tokens


def loss_and_grad(batch, ref: ReferenceOutputs, seed: int, params: SePOParams = PARAMS):
    fwd, tokens = policy_forward(batch, seed)
    eos = eos_positions(batch.input_ids, batch.response_mask, EOS)
    out = sepo_loss(build_loss_inputs(SPEC, fwd, batch.response_mask, ref, eos_mask=eos), params)  # float32, as trained
    return out, torch.autograd.grad(out.losses.sum(), tokens)[0]


# ---------------------------------------------------------------------------------------------
# unit
# ---------------------------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("exclude_eos", [False, True])
def test_sent_selection_gives_the_cache_mode_loss_and_gradient(exclude_eos):
    """Cache mode: the loss selects from r_t. Live: the group selects (`selection_records`), the bits
    cross the bridge, the policy decodes them. Same losses, same gradient, on the selected tokens only."""
    params = SePOParams(min_response_tokens=0, exclude_eos=exclude_eos)
    for seed in range(3):
        _, batch = sepo_batch(seed)
        scores = batch_scores(batch, seed)
        records = ReferenceOutputs(example_ids=list(batch.example_ids),
                                   oracle_scores=scores).to_records(batch.response_mask)
        live = ReferenceOutputs.from_records(batch.example_ids, selection_records(params, batch, records, EOS),
                                             batch.response_mask)
        assert live.oracle_scores is None and live.oracle_selection is not None
        cache = ReferenceOutputs.from_records(batch.example_ids, records, batch.response_mask)
        want, g_want = loss_and_grad(batch, cache, seed, params)
        got, g_got = loss_and_grad(batch, live, seed, params)
        torch.testing.assert_close(got.losses, want.losses, rtol=0, atol=1e-12)
        assert torch.equal(g_got, g_want)
        assert torch.equal(got.metrics["selected_fraction"], want.metrics["selected_fraction"])
        b, mask = len(batch.example_ids), batch.response_mask
        eos = eos_positions(batch.input_ids, mask, EOS)
        sel_w, sel_l = sepo_selection(params, scores[:b], scores[b:], mask[:b], mask[b:], eos[:b], eos[b:])
        selected = torch.cat([sel_w, sel_l]) != 0
        assert torch.equal(live.oracle_selection != 0, selected)
        assert selected.any() and (~selected & (mask != 0)).any()
        assert torch.equal(g_got != 0, selected)  # gradient reaches the selected tokens, and only those
        assert (selected & (eos != 0)).any() != exclude_eos


@pytest.mark.unit
def test_bit_packing_round_trips_and_a_wrong_length_is_refused():
    for n in (0, 1, 7, 8, 9, 64, 65):
        flags = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.6
        packed = pack_bits(flags)
        assert len(packed) == -(-n // 8)
        assert torch.equal(unpack_bits(packed, n), flags)
    batch = collate_pairs([dict(example_id="p0", prompt_ids=[5] * 4, chosen_ids=[9] * 5, rejected_ids=[11] * 6)],
                          pad_id=0)
    sent = selection_records(PARAMS, batch, ReferenceOutputs(
        example_ids=["p0"], oracle_scores=batch_scores(batch, 0)).to_records(batch.response_mask), EOS)
    longer = batch.response_mask.clone()
    longer[0, 1:10] = 1  # 9 chosen response tokens (2 bytes) where 5 (1 byte) were sent
    with pytest.raises(MisalignedOutputs, match=r"oracle_selection for example p0 \(chosen\) has 1 bytes.*9 resp"):
        ReferenceOutputs.from_records(["p0"], sent, longer)


class Loopback:
    """A bridge stand-in: the tensors `bridge.send` puts on the wire, handed to `bridge.recv`."""

    def __init__(self):
        self.wire = []

    def send(self, tensors, dst, tag):
        self.wire.append(tensors[0].clone())
        return SimpleNamespace(wait=lambda: None)

    def recv(self, tensors, src, tag):
        tensors[0].copy_(self.wire.pop(0))
        return SimpleNamespace(wait=lambda: None)


def message_bytes(pairs: int, *, selection: bool) -> int:
    """Bytes one OUTPUTS message of `pairs` pairs (64-token responses) takes on the bridge, as
    `bridge.recv` counts them: the bit-packed selection, or the float32 r_t cache mode stores."""
    rows = [dict(example_id=f"pair-{i:05d}", prompt_ids=[5] * 20, chosen_ids=[9] * 64, rejected_ids=[11] * 64)
            for i in range(pairs)]
    batch = collate_pairs(rows, pad_id=0)
    records = ReferenceOutputs(example_ids=list(batch.example_ids),
                               oracle_scores=batch_scores(batch, 1)).to_records(batch.response_mask)
    if selection:
        records = selection_records(PARAMS, batch, records, EOS)
    loop = Loopback()
    br.send(loop, 1, br.Message(kind=br.OUTPUTS, seq=0, example_ids=list(batch.example_ids), records=records))
    msg = br.recv(loop, 0)
    assert msg.example_ids == list(batch.example_ids) and len(msg.records) == pairs
    return msg.nbytes


@pytest.mark.unit
def test_bridge_bytes_per_pair_selection_vs_scores():
    """Per pair at 64-token responses: the selection's marginal cost (bits: 2 x 8 bytes, plus its id and
    pickle framing) against float32 r_t (2 x 256 bytes plus tensor framing); each message also pays a
    fixed container cost (torch.save's zip, ~1.4 KB). Printed for the record."""
    cost = {}
    for selection in (True, False):
        small, large = message_bytes(4, selection=selection), message_bytes(16, selection=selection)
        cost[selection] = (large - small) / 12, small - 4 * (large - small) / 12
    print(f"bridge, 64-token responses: selection {cost[True][0]:.0f} bytes/pair + {cost[True][1]:.0f} per message; "
          f"float32 scores {cost[False][0]:.0f} bytes/pair + {cost[False][1]:.0f} per message")
    assert 16 <= cost[True][0] < 120
    assert cost[True][0] * 8 < cost[False][0]


@pytest.mark.unit
def test_live_config_is_accepted_and_the_group_serves_oracle_scores():
    from sparsepo.config import load_config
    from sparsepo.reference_role.server import live_outputs

    cfg = load_config(None, ["method.name=sepo", "reference.oracle=x", "reference.mode=live",
                             "topology.reference_ranks=2", "topology.pipeline_stages=2"])
    assert live_outputs(cfg) == ("oracle_scores",)


@pytest.mark.unit
def test_policy_ranks_run_no_oracle_in_live_mode(monkeypatch):
    """The policy side of a live SePO run: a LiveSource that decodes the group's selection. Loading or
    running an oracle model (or any reference model) on a policy rank fails this test."""
    from sparsepo.config import load_config
    from sparsepo.launch.topology import Topology
    from sparsepo.reference_role import offline, sources

    def forbidden(*a, **k):
        raise AssertionError("an oracle/reference model was loaded or run on a policy rank")

    monkeypatch.setattr(offline, "load_scorer", forbidden)
    monkeypatch.setattr(OraclePair, "load", forbidden)
    monkeypatch.setattr(OraclePair, "token_scores", forbidden)
    monkeypatch.setattr("sparsepo.models.load_frozen_model", forbidden)
    inbox: queue.Queue = queue.Queue()
    monkeypatch.setattr(br, "broadcast", lambda bridge, obj, src: obj)
    monkeypatch.setattr(br, "Inbox", lambda bridge, src, window: SimpleNamespace(get=lambda t: inbox.get(timeout=t)))
    cfg = load_config(None, ["method.name=sepo", "reference.oracle=x", "reference.mode=live",
                             "topology.reference_ranks=2", "topology.pipeline_stages=2"])
    topo = Topology.build(cfg.topology, 3)
    ctx = SimpleNamespace(rank=0, device="cpu")
    source = sources.open_source(cfg, SPEC, ctx=ctx, dataset=None, collate=None, data_fingerprint="d",
                                 live=(SimpleNamespace(topology=topo), object()), handshake=None)
    assert isinstance(source, sources.LiveSource) and source.src == topo.stage_ranks(0)[-1]
    _, batch = sepo_batch(4)
    records = ReferenceOutputs(example_ids=list(batch.example_ids),
                               oracle_scores=batch_scores(batch, 4)).to_records(batch.response_mask)
    sent = selection_records(PARAMS, batch, records, EOS)
    inbox.put(br.Message(kind=br.OUTPUTS, seq=0, example_ids=list(batch.example_ids), records=sent, nbytes=123))
    ref = source.get(batch)
    assert ref.oracle_scores is None and ref.oracle_selection.shape == batch.input_ids.shape
    out, _ = loss_and_grad(batch, ref, 4)
    assert torch.isfinite(out.losses).all() and source.bytes_received == 123


# ---------------------------------------------------------------------------------------------
# distributed: the oracle pipelines against the single-process pair
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def oracle_dir(tmp_path_factory):
    """Two different tiny Llamas as oracle and oracle reference (oracle.json, relative paths)."""
    root = tmp_path_factory.mktemp("oracle_pair")
    models = {"oracle": tiny_llama(seed=1), "reference": tiny_llama(seed=0)}
    for name, model in models.items():
        model.save_pretrained(root / name)
    (root / "oracle.json").write_text(json.dumps({"oracle": "oracle", "reference": "reference"}))
    return root, OraclePair(PlainHead(models["oracle"]), PlainHead(models["reference"]))


@pytest.mark.distributed
@pytest.mark.parametrize("nproc,stages", [(2, 2), pytest.param(4, 2, marks=pytest.mark.slow)])  # 4-2: budget
def test_oracle_pipelines_equal_the_single_process_pair(oracle_dir, tmp_path, nproc, stages):
    root, pair = oracle_dir
    rows = [sepo_batch(seed, pairs=2 + seed % 2)[0] for seed in range(4)]
    torch.save(rows, tmp_path / "batches.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(WORKER), "--oracle-dir", str(root), "--batches", str(tmp_path / "batches.pt"),
           "--out", str(tmp_path), "--stages", str(stages), "--eos", str(EOS)]
    proc = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    got = {}
    for part in tmp_path.glob("oracle_rank*.pt"):
        got.update(torch.load(part, weights_only=False))
    assert len(list(tmp_path.glob("oracle_rank*.pt"))) == nproc // stages and sorted(got) == [0, 1, 2, 3]
    for i, batch_rows in enumerate(rows):
        batch = collate_pairs(batch_rows, pad_id=0)
        want = pair.token_scores(batch)
        assert want.abs().sum() > 0
        torch.testing.assert_close(got[i]["oracle_scores"], want, atol=1e-5, rtol=0)
        want_sent = selection_records(PARAMS, batch, ReferenceOutputs(
            example_ids=list(batch.example_ids), oracle_scores=want).to_records(batch.response_mask), EOS)
        assert got[i]["sent"] == want_sent


# ---------------------------------------------------------------------------------------------
# distributed: live = cache through the trainer
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world_oracle(tiny_world, tmp_path_factory):
    """An oracle for the tiny world without training one: the SFT model with its weights perturbed
    (its tokenizer kept), against the SFT model itself as the oracle reference."""
    import shutil

    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("world_oracle")
    shutil.copytree(tiny_world.sft_dir, root / "oracle")
    model = AutoModelForCausalLM.from_pretrained(root / "oracle")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(root / "oracle")
    (root / "oracle.json").write_text(json.dumps({"oracle": "oracle", "reference": str(tiny_world.sft_dir)}))
    return root


@pytest.fixture(scope="module")
def pairs6(tiny_world, tmp_path_factory):
    """The first 6 pairs of the tiny world: one epoch = 3 steps of 2, so a live run scores every pair
    and indexes its write-through cache."""
    path = tmp_path_factory.mktemp("pairs6") / "pairs.jsonl"
    path.write_text("".join(tiny_world.train_path.read_text().splitlines(keepends=True)[:6]))
    return path


def sepo_train(world, oracle, run_dir, *overrides, nproc, data=None):
    from sparsepo.recipe import write_for_method

    recipe = write_for_method(RECIPE, "sepo", run_dir.parent / f"{run_dir.name}-recipe.yaml")
    cmd = train_command(recipe, [f"model.path={world.sft_dir}", f"data.path={data or world.train_path}",
                                 f"logging.output_dir={run_dir}", "logging.progress=false", "logging.log_every=1",
                                 f"reference.oracle={oracle}", "train.micro_batch_size=2", "train.epochs=1",
                                 "optim.lr=2e-3", "optim.schedule=constant", "optim.warmup_steps=0",
                                 "method.min_response_tokens=0", *overrides], nproc=nproc)
    proc = subprocess.run(cmd, env=train_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.distributed
def test_live_sepo_matches_cache_mode_and_writes_r_t_through(tiny_world, world_oracle, pairs6, tmp_path):
    """1 policy rank + a 2-stage group against cache mode on 1 rank: the same loss and selected
    fraction at every step; the group's write-through cache has cache mode's key and r_t."""
    from sparsepo.reference.cache import CacheReader

    live = sepo_train(tiny_world, world_oracle, tmp_path / "live", "reference.mode=live",
                      "topology.reference_ranks=2", "topology.pipeline_stages=2", nproc=3, data=pairs6)
    sepo_train(tiny_world, world_oracle, tmp_path / "cache", nproc=1, data=pairs6)
    got, want = (read_scalars(tmp_path / r, "train/loss") for r in ("live", "cache"))
    assert sorted(got) == sorted(want) == [1, 2, 3]
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=1e-5), (step, got, want)
    fractions = [read_scalars(tmp_path / r, "train/selected_fraction") for r in ("live", "cache")]
    assert fractions[0] == pytest.approx(fractions[1], abs=1e-6) and all(0 < v < 1 for v in fractions[0].values())
    assert "bytes/pair" in live.stdout + live.stderr
    live_dir, cache_dir = tmp_path / "live" / "ref_cache", tmp_path / "cache" / "ref_cache"
    live_index, cache_index = (json.loads((d / "index.json").read_text()) for d in (live_dir, cache_dir))
    assert live_index["fingerprint"] == cache_index["fingerprint"]
    live_reader, cache_reader = CacheReader(live_dir, cache_index["fingerprint"]), CacheReader(cache_dir)
    ids = sorted(cache_reader.location)
    assert sorted(live_reader.location) == ids and len(ids) == 6
    for a, b in zip(live_reader.get(ids), cache_reader.get(ids)):
        assert set(a) == set(b) == {"oracle_scores"}
        for side in (0, 1):
            torch.testing.assert_close(a["oracle_scores"][side], b["oracle_scores"][side], atol=1e-5, rtol=0)


@pytest.mark.distributed
def test_an_oracle_with_another_tokenizer_is_refused_in_live_mode(tiny_world, tmp_path):
    """The oracle check every mode runs (`oracle_manifest`) runs in live mode too, on every rank before
    the pipelines load anything: the launch fails naming the oracle's tokenizer, and nothing is scored."""
    from test_sepo_oracle import other_tokenizer_copy

    odd = other_tokenizer_copy(tiny_world, tmp_path / "odd")
    oracle = tmp_path / "oracle"
    oracle.mkdir()
    (oracle / "oracle.json").write_text(json.dumps({"oracle": str(odd), "reference": str(tiny_world.sft_dir)}))
    with pytest.raises(AssertionError) as e:
        sepo_train(tiny_world, oracle, tmp_path / "run", "reference.mode=live", "topology.reference_ranks=2",
                   "topology.pipeline_stages=2", nproc=3)
    assert "the oracle tokenizer at" in str(e.value) and str(odd) in str(e.value)
    assert not (tmp_path / "run" / "ref_cache").exists() and not (tmp_path / "run" / "final").exists()
