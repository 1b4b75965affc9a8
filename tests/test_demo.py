"""The embedded offline demo world: reward, world preparation (tiny size), evaluation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sparsepo.demo import ground_truth_reward, normalized_reward
from sparsepo.demo.reward import LEXICON, NEGATIVE, POSITIVE, reward_details

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# --------------------------------------------------------------------------------------- reward


@pytest.mark.parametrize("text, expected", [
    ("The food was good.", 1.0),
    ("Awful. Just awful.", -4.0),
    ("The staff was not rude.", 1.0),  # negation flips the next lexicon word
    ("It was not good.", -1.0),
    ("No idea, not sure.", 0.0),  # negators before non-lexicon words do nothing
    ("It was okay.", 0.5),
    ("GOOD, Great!! wonderful", 4.0),  # case-insensitive, punctuation ignored
    ("The food was good and the staff was not rude.", 2.0),
    ("We loved it, but the coffee was mediocre.", 1.5),
    ("", 0.0),
    ("not", 0.0),
])
def test_reward_hand_checked(text, expected):
    assert ground_truth_reward(text) == expected


def test_reward_grows_with_length_but_normalized_does_not():
    one = "The food was good."
    three = "The food was good. The food was good. The food was good."
    assert ground_truth_reward(three) == 3 * ground_truth_reward(one) == 3.0
    assert normalized_reward(three) == pytest.approx(normalized_reward(one)) == pytest.approx(0.25)
    # a longer response with a weaker word per sentence can outscore a short strong one
    assert ground_truth_reward("It was fine. It was fine. It was fine. It was fine. It was fine.") > \
        ground_truth_reward("It was wonderful.")
    d = reward_details("I hated it. The view was not bad, and the staff was great.")
    assert (d.reward, d.n_positive, d.n_negative, d.n_words) == (0.0, 2, 1, 13)


def test_lexicons():
    assert not set(POSITIVE) & set(NEGATIVE)
    assert all(v > 0 for v in POSITIVE.values()) and all(v > 0 for v in NEGATIVE.values())
    assert LEXICON["good"] == 1.0 and LEXICON["bad"] == -1.0 and LEXICON["terrible"] == -2.0


def test_package_import_is_light():
    code = "import sys, sparsepo.demo as d; assert 'torch' not in sys.modules, 'torch imported'; print(d.ground_truth_reward('good'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1.0"


# --------------------------------------------------------------------------------------- world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from sparsepo.demo import prepare_world

    root = tmp_path_factory.mktemp("world")
    t0 = time.perf_counter()
    paths = prepare_world(root, size="tiny", seed=0, progress=False)
    print(f"tiny world built in {time.perf_counter() - t0:.1f}s")
    return paths


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_world_files(world):
    for p in (world.train_path, world.eval_prompts_path, world.meta_path, world.tokenizer_dir / "tokenizer.json",
              world.sft_dir / "config.json", world.sft_dir / "tokenizer.json", world.sft_dir / "generation_config.json"):
        assert p.exists(), p
    meta = json.loads(world.meta_path.read_text())
    for key in ("fingerprint", "settings", "sft_final_loss", "timings_s", "sft_sample_mean_reward", "n_pairs",
                "pairs_correctly_ordered"):
        assert key in meta, key
    assert meta["settings"]["size"] == "tiny" and meta["n_pairs"] == 64
    assert meta["sft_final_loss"] < meta["sft_first_loss"]


def test_tokenizer(world):
    from transformers import AutoTokenizer

    rows = _rows(world.train_path)
    for d in (world.tokenizer_dir, world.sft_dir):
        tok = AutoTokenizer.from_pretrained(d)
        assert tok.pad_token_id is not None and tok.bos_token_id is not None and tok.eos_token_id is not None
        assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}) == 4
        assert tok.chat_template
        prompt, response = "Review of the old cafe:", "The coffee was great, but the staff was not friendly."
        p = tok(prompt)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"]
        assert p[0] == tok.bos_token_id and tok.bos_token_id not in r
        assert tok.decode(r) == response
        assert tok.decode(p, skip_special_tokens=True) == prompt
        chat = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)
        assert list(chat["input_ids"]) == p
        full = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                                       tokenize=False)
        assert tok(full, add_special_tokens=False)["input_ids"] == p + r + [tok.eos_token_id]
        # the joining convention is stable on the real pairs too
        for row in rows:
            for resp in (row["chosen"], row["rejected"]):
                joint = tok(row["prompt"] + " " + resp)["input_ids"]
                assert joint == tok(row["prompt"])["input_ids"] + tok(resp, add_special_tokens=False)["input_ids"]


def test_model_loads(world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world.sft_dir)
    model = AutoModelForCausalLM.from_pretrained(world.sft_dir)
    assert model.config.vocab_size == len(tok)
    assert model.config.max_position_embeddings >= 256
    gc = model.generation_config
    assert (gc.eos_token_id, gc.bos_token_id, gc.pad_token_id) == (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id)
    ids = torch.tensor([tok("Notes on the new laptop:")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_pairs_and_eval_prompts(world):
    rows = _rows(world.train_path)
    assert len(rows) == 64
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert all(isinstance(row[k], str) and row[k].strip() for k in row)
        assert row["chosen"] != row["rejected"]
        assert not row["chosen"].startswith(row["prompt"])  # responses exclude the prompt
    evals = _rows(world.eval_prompts_path)
    assert len(evals) == 16 and all(set(e) == {"prompt"} and e["prompt"] for e in evals)
    assert not {e["prompt"] for e in evals} & {r["prompt"] for r in rows}


def test_labels_follow_reward(world):
    rows = _rows(world.train_path)
    correct = sum(ground_truth_reward(r["chosen"]) > ground_truth_reward(r["rejected"]) for r in rows) / len(rows)
    assert correct >= 0.65, correct
    meta = json.loads(world.meta_path.read_text())
    assert meta["pairs_correctly_ordered"] == pytest.approx(correct, abs=1e-3)


def test_cache_hit_does_not_rebuild(world, monkeypatch):
    from sparsepo.demo import world as world_mod

    def boom(*a, **k):
        raise AssertionError("rebuilt a cached world")

    monkeypatch.setattr(world_mod, "_build", boom)
    mtime = world.meta_path.stat().st_mtime_ns
    t0 = time.perf_counter()
    again = world_mod.prepare_world(world.root, size="tiny", seed=0, progress=False)
    assert time.perf_counter() - t0 < 2.0
    assert again == world and world.meta_path.stat().st_mtime_ns == mtime


def test_unfinished_or_changed_world_is_rebuilt(world, tmp_path, monkeypatch):
    from sparsepo.demo import world as world_mod

    calls = []
    monkeypatch.setattr(world_mod, "_build", lambda paths, *a, **k: calls.append(paths.root))
    half = tmp_path / "half"
    shutil.copytree(world.root, half)
    (half / "world.json").unlink()  # as if the build died before the end
    world_mod.prepare_world(half, size="tiny", progress=False)
    assert calls == [half]
    other = tmp_path / "other"
    shutil.copytree(world.root, other)
    world_mod.prepare_world(other, size="tiny", seed=1, progress=False)  # other settings
    assert calls == [half, other]
    with pytest.raises(ValueError, match="unknown world size"):
        world_mod.prepare_world(tmp_path / "x", size="huge")


def test_force_rebuilds_deterministically(world):
    from sparsepo.demo import prepare_world

    before = world.train_path.read_text()
    mtime = world.meta_path.stat().st_mtime_ns
    prepare_world(world.root, size="tiny", seed=0, force=True, progress=False)
    assert world.meta_path.stat().st_mtime_ns != mtime
    assert world.train_path.read_text() == before  # same seed, same world


# --------------------------------------------------------------------------------------- evaluate


def test_win_rate_helper():
    from sparsepo.demo import win_rate

    assert win_rate([1.0, 2.0, 3.0], [0.0, 2.0, 5.0]) == pytest.approx(0.5)  # win, tie, loss
    assert win_rate([1.0, 1.0], [0.0, 0.5]) == 1.0
    assert win_rate([0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]) == pytest.approx(0.625)
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])
    with pytest.raises(ValueError):
        win_rate([], [])


def test_response_logps_padding_invariant(world):
    from transformers import AutoModelForCausalLM

    from sparsepo.demo.sampling import response_logps

    model = AutoModelForCausalLM.from_pretrained(world.sft_dir)
    prompts = [[1, 10, 11], [1, 12], [1, 13, 14, 15, 16]]
    responses = [[20, 21, 22, 23, 2], [24], [25, 26]]
    batched = response_logps(model, prompts, responses, pad_id=0)
    single = [response_logps(model, [p], [r], pad_id=0)[0] for p, r in zip(prompts, responses)]
    assert batched == pytest.approx(single, abs=1e-4)
    assert all(v < 0 for v in batched)


def test_evaluate_self_gives_zero_kl_and_even_win_rate(world, tmp_path):
    from sparsepo.demo import evaluate_policy

    policy = tmp_path / "policy"  # a separate copy, so both models are really loaded and scored
    shutil.copytree(world.sft_dir, policy)
    kw = dict(samples_per_prompt=4, max_new_tokens=24, seed=3, progress=False)
    res = evaluate_policy(policy, world.sft_dir, world.eval_prompts_path, **kw)
    for key in ("win_rate", "kl", "policy_reward", "reference_reward", "policy_length", "reference_length", "n"):
        assert key in res, key
    assert res["n"] == 64
    assert abs(res["kl"]) < 1e-4
    assert 0.25 <= res["win_rate"] <= 0.75
    assert 0 < res["policy_length"] <= 24 and 0 < res["reference_length"] <= 24
    again = evaluate_policy(policy, world.sft_dir, world.eval_prompts_path, **kw)
    drop = ("elapsed_s",)
    assert {k: v for k, v in again.items() if k not in drop} == {k: v for k, v in res.items() if k not in drop}
