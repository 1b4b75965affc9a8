"""One tokenizer rule (`config.paths.run_tokenizer`: the policy's) and one check: a reference (or SePO
oracle, or the model an SAE reads) whose tokenizer differs from the policy's is refused before anything
loads, naming both directories, through the entry every mode runs (`sparsepo.train.main`: cache,
inline, live, precompute; exit 2 as a config error). The model directories here hold a config and a
tokenizer but no weights: a run that got as far as loading one would fail differently."""

from __future__ import annotations

import json
import sys
import types

import pytest

from sparsepo.config import load_config
from sparsepo.config.paths import run_tokenizer

pytestmark = pytest.mark.unit

WORDS = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]


def model_dir(path, words=WORDS, vocab: int = 64):
    """config.json (a tiny Llama) + a word-level tokenizer; no weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    path.mkdir(parents=True)
    LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=vocab).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(path)
    return path


@pytest.fixture
def dirs(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "w1 w2", "chosen": "w3", "rejected": "w4"}) + "\n")
    swapped = WORDS[:4] + list(reversed(WORDS[4:]))  # same size, other ids
    return dict(policy=model_dir(tmp_path / "policy"), same=model_dir(tmp_path / "same"),
                odd=model_dir(tmp_path / "odd", swapped), data=data, out=tmp_path / "run")


def argv(d, *more):
    return [f"model.path={d['policy']}", f"data.path={d['data']}", f"logging.output_dir={d['out']}", *more]


def refused(d, capsys, monkeypatch, *more) -> str:
    """Run the real entry point; it must exit 2 before torch.distributed or any weights load. What
    main would run next (training, precompute, shutdown) is replaced by a failure."""
    import sparsepo.train as entry

    def past(*_a, **_k):
        pytest.fail("main went past the tokenizer check")

    for name, attr in (("sparsepo.engine.dist", "shutdown"), ("sparsepo.trainer", "train"),
                       ("sparsepo.reference_role.precompute", "precompute")):
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**{attr: past}))
    monkeypatch.setattr(entry, "run_live", past)
    monkeypatch.setattr("sparsepo.preemption.PreemptionFlag", lambda: None)  # no signal handlers in pytest
    for name in ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM"):
        monkeypatch.setenv(name, "1" if name == "OMP_NUM_THREADS" else "false")
    with pytest.raises(SystemExit) as e:
        entry.main(argv(d, *more))
    assert e.value.code == 2
    return capsys.readouterr().err


def test_the_run_tokenizer_is_the_policys(dirs):
    cfg = load_config(None, argv(dirs, f"reference.path={dirs['odd']}"))
    assert run_tokenizer(cfg) == str(dirs["policy"])  # not the reference's, which the old server used
    cfg = load_config(None, argv(dirs, f"model.tokenizer={dirs['same']}", f"reference.path={dirs['odd']}"))
    assert run_tokenizer(cfg) == str(dirs["same"])


@pytest.mark.parametrize("mode", ["cache", "inline", "precompute"])
def test_a_reference_with_another_tokenizer_is_refused_before_anything_loads(dirs, capsys, monkeypatch, mode):
    err = refused(dirs, capsys, monkeypatch, f"reference.mode={mode}", f"reference.path={dirs['odd']}")
    assert "config error" in err and "reference tokenizer" in err
    assert str(dirs["odd"]) in err and str(dirs["policy"]) in err, err
    assert not (dirs["out"] / "ref_cache").exists()


def test_live_mode_refuses_it_on_every_process_before_the_topology(dirs, capsys, monkeypatch):
    """Live: the same check runs in main before run_live (plan, bridge, pipelines) on each process."""
    err = refused(dirs, capsys, monkeypatch, "reference.mode=live", f"reference.path={dirs['odd']}",
                  "topology.reference_ranks=1")
    assert "reference tokenizer" in err and str(dirs["odd"]) in err and str(dirs["policy"]) in err


def test_a_reference_with_the_same_tokenizer_passes_and_a_bigger_vocabulary_does_not(dirs, tmp_path):
    from sparsepo.models import TokenizerMismatch
    from sparsepo.prelaunch import check_run_tokenizer

    check_run_tokenizer(load_config(None, argv(dirs, f"reference.path={dirs['same']}")))
    check_run_tokenizer(load_config(None, argv(dirs, "method.name=simpo", f"reference.path={dirs['odd']}")))  # no reference
    big = model_dir(tmp_path / "big", vocab=72)
    with pytest.raises(TokenizerMismatch, match=rf"reference at {big} has a vocabulary of 72 but the policy"):
        check_run_tokenizer(load_config(None, argv(dirs, f"reference.path={big}")))


def test_an_sae_trained_on_a_reference_with_another_tokenizer_is_refused(dirs):
    from sparsepo.models import TokenizerMismatch
    from sparsepo.sae.runtime import train_for_run

    cfg = load_config(None, argv(dirs, f"reference.path={dirs['odd']}"))
    with pytest.raises(TokenizerMismatch, match="SAE's model"):
        train_for_run(cfg, dirs["out"] / "sae")


def test_no_module_reads_the_tokenizer_setting_but_the_rule():
    """`cfg.model.tokenizer` is read in config/ only (the rule and the path checks): no second rule."""
    import ast

    from test_shape import MODULES

    reads = sorted(name for name, path in MODULES.items() if not name.startswith("sparsepo.config")
                   for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.Attribute) and node.attr == "tokenizer"
                   and isinstance(node.value, ast.Attribute) and node.value.attr == "model"
                   and getattr(node.value.value, "id", None) == "cfg")
    assert reads == []
