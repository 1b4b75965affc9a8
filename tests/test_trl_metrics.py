"""TRL's metric names (`sparsepo.metrics`), the log window that keeps values on the device until a
log step, the held-out split and the eval section's refusals."""

import json

import pytest
import torch

from sparsepo.config import ConfigError, load_config
from sparsepo.logprobs.plain import Logits
from sparsepo.metrics import MetricWindow, flat_config, pair_values, token_stats


def test_pair_values_are_trls_statistics_per_pair():
    got = pair_values(torch.tensor([0.25, 0.75]), torch.tensor([1.0, -0.5]), torch.tensor([0.5, 0.5]),
                      torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -9.0]))
    want = {"loss": [0.25, 0.75], "rewards/chosen": [1.0, -0.5], "rewards/rejected": [0.5, 0.5],
            "rewards/accuracies": [1.0, 0.0], "rewards/margins": [0.5, -1.0], "logps/chosen": [-10.0, -12.0],
            "logps/rejected": [-11.0, -9.0]}
    assert {k: v.tolist() for k, v in got.items()} == want


def test_mean_logits_reads_the_positions_that_predict_response_tokens():
    # response tokens at t = 1, 2 are predicted by logits[0] and logits[1]: mean(1, 3, 5, 7) = 4;
    # the last position predicts nothing (its 100s must not count), nor does a masked-out row
    logits = torch.tensor([[[1.0, 3.0], [5.0, 7.0], [100.0, 100.0]], [[-50.0, -50.0], [0.0, 0.0], [9.0, 9.0]]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    logit_mean = Logits(logits).fields(torch.zeros(2, 3, dtype=torch.long), mask, logit_mean=True)["logit_mean"]
    from types import SimpleNamespace

    got = token_stats(SimpleNamespace(entropy=None, logit_mean=logit_mean), torch.zeros(2, 3, dtype=torch.long), mask)
    assert float(got["logits/chosen"]) == pytest.approx(4.0)  # row 0 is the chosen row, row 1 the rejected
    assert float(got["logits/rejected"]) == 0.0


def test_token_stats_are_trls_entropy_and_mean_token_accuracy():
    """entropy: token mean over the response positions of all rows; mean_token_accuracy: the chosen rows'
    response tokens that are the argmax. Rows: 2 chosen, 2 rejected; position 0 is prompt."""
    from types import SimpleNamespace

    mask = torch.tensor([[0, 1, 1], [0, 1, 0], [0, 1, 1], [0, 0, 1]], dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7], [5, 8, 9], [5, 6, 7], [5, 1, 2]])
    top1 = torch.tensor([[9, 6, 3], [9, 8, 9], [9, 6, 7], [9, 1, 2]])  # chosen hits: (0,1), (1,1); (0,2) misses
    entropy = torch.tensor([[9.0, 1.0, 2.0], [9.0, 3.0, 9.0], [9.0, 4.0, 5.0], [9.0, 9.0, 6.0]])
    got = token_stats(SimpleNamespace(entropy=entropy, top1_ids=top1, logit_mean=None), ids, mask)
    assert float(got["entropy"]) == pytest.approx((1 + 2 + 3 + 4 + 5 + 6) / 6)
    assert float(got["mean_token_accuracy"]) == pytest.approx(2 / 3)


def test_window_means_each_name_over_the_steps_that_reported_it_and_empties():
    w = MetricWindow()
    w.add({"loss": torch.tensor(1.0), "sae_ev": 0.5, "step_time": 2.0})
    w.add({"loss": torch.tensor(3.0), "step_time": 4.0})
    assert w.flush() == {"loss": 2.0, "sae_ev": 0.5, "step_time": 3.0}
    w.add({"loss": torch.tensor(5.0)})
    assert w.flush() == {"loss": 5.0}


def test_flat_config_is_tensorboard_hparams():
    flat = flat_config({"optim": {"lr": 1e-4, "betas": [0.9, 0.99]}, "method": {"name": "dpo", "beta": 0.1}})
    assert flat == {"optim.lr": 1e-4, "optim.betas": "[0.9, 0.99]", "method.name": "dpo", "method.beta": 0.1}


def tagged(n):
    import datasets

    from sparsepo.data.pipeline import _SETTINGS_TAG

    ds = datasets.Dataset.from_dict({"example_id": [f"e{i}" for i in range(n)]})
    ds.info.description = _SETTINGS_TAG + json.dumps({"max_length": 8})
    return ds


def test_holdout_split_is_disjoint_seeded_and_keyed_apart():
    from sparsepo.data import DataError, dataset_fingerprint, holdout_split

    train, held = holdout_split(tagged(10), 0.3, seed=0)
    ids = lambda d: list(d["example_id"])  # noqa: E731
    assert len(held) == 3 and len(train) == 7
    assert sorted(ids(train) + ids(held), key=lambda s: int(s[1:])) == [f"e{i}" for i in range(10)]
    assert ids(train) == sorted(ids(train), key=lambda s: int(s[1:]))  # source order kept
    assert ids(holdout_split(tagged(10), 0.3, seed=0)[1]) == ids(held)
    assert any(ids(holdout_split(tagged(10), 0.3, seed=s)[1]) != ids(held) for s in range(1, 4))
    assert dataset_fingerprint(train) != dataset_fingerprint(tagged(10))  # the cache keys on what is trained
    assert len(holdout_split(tagged(3), 0.01, seed=0)[1]) == 1  # at least one held-out pair
    with pytest.raises(DataError, match="eval.fraction"):
        holdout_split(tagged(1), 0.5, seed=0)


@pytest.mark.parametrize("overrides, needle", [
    (["eval.path=x.jsonl", "eval.fraction=0.1"], "eval.path and eval.fraction are all set"),
    (["eval.split=test", "eval.fraction=0.1"], "eval.split and eval.fraction are all set"),
    (["eval.split=train"], "the pairs it trains on"),
    (["eval.fraction=1.0"], "must be in [0, 1)"),
    (["eval.every_steps=5"], "no eval pairs"),
    (["eval.fraction=0.1", "eval.batch_size=0"], "eval.batch_size=0"),
    (["eval.fraction=0.1", "method.name=spo", "reference.mode=inline"], "method 'spo'"),
])
def test_eval_section_refusals_name_the_keys(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert needle in str(e.value)


def test_eval_split_reads_another_split_of_the_training_source(tiny_world, tmp_path):
    """TRL's eval_dataset=ds["test"]: eval.split takes the held-out pairs from data.path's other split; a
    single file has no splits (refused naming the key), a missing split names the ones there are."""
    import datasets

    from sparsepo.data import DataError, load_preference_dataset
    from sparsepo.rundata import load_eval_pairs, load_run_tokenizer

    rows = datasets.load_dataset("json", data_files=str(tiny_world.train_path), split="train")
    datasets.DatasetDict({"train": rows.select(range(8)), "test": rows.select(range(8, 11))}).save_to_disk(
        str(tmp_path / "dd"))
    cfg = load_config(None, [f"model.path={tiny_world.sft_dir}", f"data.path={tmp_path / 'dd'}", "eval.split=test"])
    tokenizer = load_run_tokenizer(cfg)
    held = list(load_eval_pairs(cfg, tokenizer)["example_id"])
    trained = set(load_preference_dataset(cfg.data, tokenizer)[0]["example_id"])
    assert len(held) == 3 and len(trained) == 8 and not trained & set(held)
    with pytest.raises(DataError, match="splits \\['test', 'train'\\], none named 'dev'"):
        load_eval_pairs(load_config(None, [f"model.path={tiny_world.sft_dir}", f"data.path={tmp_path / 'dd'}",
                                           "eval.split=dev"]), load_run_tokenizer(cfg))
    with pytest.raises(DataError, match="eval.split='test'.*one file"):
        load_eval_pairs(load_config(None, [f"model.path={tiny_world.sft_dir}", f"data.path={tiny_world.train_path}",
                                           "eval.split=test"]), load_run_tokenizer(cfg))


def test_eval_section_defaults_to_no_evaluation():
    cfg = load_config(None, ["eval.fraction=0.2", "eval.every_steps=10"])
    assert (cfg.eval.fraction, cfg.eval.every_steps, cfg.eval.batch_size, cfg.eval.path) == (0.2, 10, 8, None)


def recipe(tmp_path, method):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"method": method}))
    return path


def test_overriding_method_name_drops_the_files_keys_the_new_method_does_not_take(tmp_path, caplog):
    path = recipe(tmp_path, {"name": "dpo", "beta": 0.2, "label_smoothing": 0.1, "ld_alpha": 0.5})
    with caplog.at_level("WARNING", logger="sparsepo"):
        cfg = load_config(path, ["method.name=simpo", "method.gamma=1.0"])
    assert cfg.method.name == "simpo" and (cfg.method.params.beta, cfg.method.params.gamma) == (0.2, 1.0)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "method.label_smoothing, method.ld_alpha" in warned[0], warned
    with pytest.raises(ConfigError, match="unknown key 'method.label_smoothing'"):  # no override: refused
        load_config(path.parent / recipe(tmp_path, {"name": "simpo", "label_smoothing": 0.1}).name)


def test_a_typo_is_still_refused_and_the_overrides_own_keys_are_kept(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'method.bta'.*Did you mean 'beta'"):
        load_config(recipe(tmp_path, {"name": "dpo", "bta": 0.2}), ["method.name=simpo"])
    with pytest.raises(ConfigError, match="unknown key 'method.label_smoothing'"):
        load_config(recipe(tmp_path, {"name": "dpo"}), ["method.name=simpo", "method.label_smoothing=0.1"])
