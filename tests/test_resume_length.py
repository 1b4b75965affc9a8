"""A resume with another train.max_steps: the first resumed step already uses the new length's LR
(before: the rate the old curve ended at, 0 for a finished cosine run), and one warning says so."""

import math

import pytest

from conftest import read_scalars, run_training


def cosine(step, total, lr=1e-3):
    """transformers' cosine_with_min_lr at min ratio 0, no warmup: the rate used at 1-based `step`."""
    return lr * 0.5 * (1 + math.cos(math.pi * (step - 1) / total))


def test_apply_schedule_sets_the_rate_of_the_current_step():
    from types import SimpleNamespace

    import torch
    from transformers import get_scheduler

    from sparsepo.engine.policy import PolicyEngine

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    old = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=2)
    for _ in range(2):
        opt.step(), old.step()  # the end of the old run: rate 0
    saved_opt, saved_sched = opt.state_dict(), old.state_dict()
    new = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=4)
    opt.load_state_dict(saved_opt), new.load_state_dict(saved_sched)  # what DeepSpeed's load restores
    assert opt.param_groups[0]["lr"] == 0.0
    PolicyEngine(SimpleNamespace(lr_scheduler=new)).apply_schedule()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5) and new.get_last_lr() == [pytest.approx(0.5)]


def test_resume_with_a_longer_run_uses_the_new_rate_from_its_first_step(tiny_world, tmp_path):
    common = ["train.micro_batch_size=4", "optim.lr=1e-3", "optim.warmup_steps=0", "optim.schedule=cosine",
              "checkpoint.every_steps=2", "logging.overwrite=true"]
    run_training(tiny_world, tmp_path, *common, "train.max_steps=2")
    proc = run_training(tiny_world, tmp_path, *common, "train.max_steps=4", resume="auto")
    lr = read_scalars(tmp_path, "train/learning_rate")
    assert lr[3] == pytest.approx(cosine(3, 4), rel=1e-6) and lr[4] == pytest.approx(cosine(4, 4), rel=1e-6)
    assert (proc.stdout + proc.stderr).count("LR schedule is recomputed for the new length") == 1


def test_warmup_ratio_is_ceil_of_the_total_and_excludes_warmup_steps():
    from sparsepo.config import ConfigError, load_config, lr_schedule

    cfg = load_config(None, ["optim.warmup_ratio=0.15", "optim.warmup_steps=0"])
    assert lr_schedule(cfg, 10)[1]["num_warmup_steps"] == 2  # ceil(1.5), as transformers
    assert lr_schedule(cfg, 100)[1]["num_warmup_steps"] == 15
    assert lr_schedule(load_config(None, ["optim.warmup_steps=3"]), 100)[1]["num_warmup_steps"] == 3
    for bad in (["optim.warmup_ratio=0.1", "optim.warmup_steps=5"], ["optim.warmup_ratio=1.0"]):
        with pytest.raises(ConfigError, match="optim.warmup_ratio"):
            load_config(None, bad)
