"""Issue 25: SPO's prompt file joins the run's data fingerprint, the one the checkpoint's data check
compares, so a prompt file rewritten at the same path between a save and a resume is refused."""

import os

import pytest

from sparsepo.config import load_config
from sparsepo.rundata import with_prompts

pytestmark = pytest.mark.unit
PAIRS_FP = "ab" * 8


def cfg(prompts, method="spo"):
    extra = ["reference.mode=inline"] if method == "spo" else []
    return load_config(None, [f"method.name={method}", f"generation.prompts_path={prompts}", *extra])


def test_a_prompt_file_rewritten_in_place_changes_the_fingerprint(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "tell me a story"}\n')
    stamp = prompts.stat().st_mtime_ns
    before = with_prompts(cfg(prompts), PAIRS_FP)
    assert before != PAIRS_FP and len(before) == len(PAIRS_FP)
    assert with_prompts(cfg(prompts), PAIRS_FP) == before  # same content: same fingerprint
    prompts.write_text('{"prompt": "tell me a joke!"}\n')  # same size, same path
    os.utime(prompts, ns=(stamp, stamp))  # and the same mtime (cp -p, rsync -a): still caught
    assert with_prompts(cfg(prompts), PAIRS_FP) != before
    assert with_prompts(cfg(prompts), "cd" * 8) != with_prompts(cfg(prompts), PAIRS_FP)  # the pairs still count


def test_the_checkpoint_refuses_other_prompts(tmp_path):
    from sparsepo.checkpoint import CheckpointError, check_compatible
    from sparsepo.checkpoint_integrity import META, seal
    from sparsepo.config import to_dict

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    run = cfg(prompts)
    tag = tmp_path / "step-00000002"
    tag.mkdir()
    (tag / META).write_text(seal({"step": 2, "samples": 8, "world_size": 1, "global_batch": 4,
                                  "data": with_prompts(run, PAIRS_FP), "config": to_dict(run), "files": {}}))
    check_compatible(tag, run, data_fingerprint=with_prompts(run, PAIRS_FP), world_size=1)
    prompts.write_text('{"prompt": "b"}\n')
    with pytest.raises(CheckpointError, match="different data .*generation.prompts_path"):
        check_compatible(tag, run, data_fingerprint=with_prompts(run, PAIRS_FP), world_size=1)


def test_methods_that_do_not_sample_keep_the_pairs_fingerprint(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    assert with_prompts(cfg(prompts, method="dpo"), PAIRS_FP) == PAIRS_FP  # the reference cache key stays
