"""Issue 25: non-finite floats refused in the config, and the loop's non-finite guard (sparsepo.guard)."""

import math

import pytest
import yaml

from sparsepo.config import ConfigError, load_config
from sparsepo.guard import NonFiniteError, NonFiniteGuard


@pytest.mark.parametrize("override, key", [
    ("optim.lr=1e400", "optim.lr"),  # parses as inf: an easy typo for 1e-4
    ("optim.lr=inf", "optim.lr"),
    ("optim.lr=.nan", "optim.lr"),
    ("optim.grad_clip=-.inf", "optim.grad_clip"),
    ("optim.betas=[0.9, .nan]", "optim.betas"),
    ("method.beta=nan", "method.beta"),
    ("reference.timeout_s=1e999", "reference.timeout_s"),
    ("optim.eps=" + "1" * 400, "optim.eps"),  # an int beyond a double
])
def test_non_finite_float_refused_naming_key_and_override(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert f"'{key}'" in msg and "command-line override" in msg and "\n" not in msg, msg


def test_non_finite_float_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match=r"'optim.lr' in .*run.yaml is inf"):
        load_config(path)


def test_a_refusal_names_the_override_not_the_recipe(tmp_path):
    # the recipe sets optim.lr; the command line replaces it with a bad value: blame the command line
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump({"optim": {"lr": 1e-4}, "train": {"epochs": 1}}))
    with pytest.raises(ConfigError) as e:
        load_config(path, ["optim.lr=-0.0001"])
    assert "command-line override 'optim.lr=-0.0001'" in str(e.value) and "demo.yaml" not in str(e.value)
    with pytest.raises(ConfigError, match="epochs=0 in .*demo.yaml"):  # and the file when the file set it
        path.write_text(yaml.safe_dump({"train": {"epochs": 0}}))
        load_config(path)


def test_max_nonfinite_steps_negative_refused():
    with pytest.raises(ConfigError, match="train.max_nonfinite_steps=-1 in command-line override"):
        load_config(None, ["train.max_nonfinite_steps=-1"])


class FakePolicy:
    """What the guard reads from the policy engine: DeepSpeed's skip counter and the weights' health."""

    def __init__(self, skipped=0):
        self.skipped, self.bad_weights, self.weight_checks = skipped, 0, 0

    def skipped_steps(self):
        return self.skipped

    def nonfinite_weights(self):
        self.weight_checks += 1
        return self.bad_weights


def test_guard_counts_nan_loss_inf_norm_and_deepspeed_skips_then_fails():
    policy, guard = FakePolicy(), None
    guard = NonFiniteGuard.for_engine(2, policy)
    ok = {"loss": 0.69, "grad_norm": 1.0}
    guard.step(1, ok, policy)
    assert guard.count == 0 and ok["nonfinite_steps"] == 0 and policy.weight_checks == 0
    guard.step(2, {"loss": math.nan, "grad_norm": 1.0}, policy)
    policy.skipped = 1  # DeepSpeed's overflow skip with finite-looking metrics counts too
    guard.step(3, {"loss": 0.5, "grad_norm": 0.3}, policy)
    assert guard.count == 2 and guard.steps == [2, 3] and policy.weight_checks == 2
    guard.step(4, dict(ok), policy)  # no new skip: not counted
    with pytest.raises(NonFiniteError, match=r"3 non-finite optimiser steps .*steps 2, 3, 5.*max_nonfinite_steps=2"):
        guard.step(5, {"loss": 0.5, "grad_norm": math.inf}, policy)


def test_guard_resumes_with_deepspeeds_restored_skip_count():
    policy = FakePolicy(skipped=2)  # a checkpoint restored after two skipped steps
    guard = NonFiniteGuard.for_engine(2, policy)
    guard.step(7, {"loss": 0.4, "grad_norm": 1.0}, policy)  # the restored count is not a new skip
    with pytest.raises(NonFiniteError, match="3 non-finite"):
        guard.step(8, {"loss": math.nan, "grad_norm": math.nan}, policy)


def test_guard_between_log_steps_counts_deepspeeds_skip_and_fp16_calibration_is_not_counted():
    """Between log steps the loop hands no loss or norm (no host sync): DeepSpeed's skip still counts.
    Under fp16 the dynamic loss scaler skips steps by design while it calibrates: those are not counted,
    a non-finite loss on a log step still is."""
    policy = FakePolicy()
    guard = NonFiniteGuard.for_engine(0, policy)
    guard.step(1, {}, policy)
    policy.skipped = 1
    with pytest.raises(NonFiniteError, match="1 non-finite"):
        guard.step(2, {}, policy)
    policy = FakePolicy()
    guard = NonFiniteGuard.for_engine(0, policy, "fp16")
    policy.skipped = 3
    guard.step(1, {}, policy)
    assert guard.count == 0
    with pytest.raises(NonFiniteError, match="1 non-finite"):
        guard.step(2, {"loss": math.nan}, policy)


def test_guard_fails_at_once_on_a_non_finite_weight():
    policy = FakePolicy()
    guard = NonFiniteGuard.for_engine(100, policy)
    guard.check_weights(policy, "before the final model")  # healthy: nothing raised
    policy.bad_weights = 5
    with pytest.raises(NonFiniteError, match="5 non-finite weight"):
        guard.step(1, {"loss": math.nan, "grad_norm": 0.0}, policy)


def test_policy_engine_counts_non_finite_weights_of_its_partitions():
    import torch

    from sparsepo.engine.policy import PolicyEngine

    class Engine:
        module = torch.nn.Linear(3, 2)
        skipped_steps = 4

    engine = PolicyEngine(Engine())
    assert engine.nonfinite_weights() == 0 and engine.skipped_steps() == 4
    with torch.no_grad():
        Engine.module.weight[0, 1] = math.inf
        Engine.module.bias[1] = math.nan
    assert engine.nonfinite_weights() == 2
    Engine.module.weight.ds_tensor = torch.zeros(1)  # under ZeRO-3 only the local partition counts
    assert engine.nonfinite_weights() == 1


@pytest.mark.integration  # a subprocess: out of the -m unit loop
def test_train_entry_point_exits_2_on_lr_1e400_before_anything_runs(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "sparsepo.train", "optim.lr=1e400",
                           f"logging.output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "config error: 'optim.lr' in command-line override 'optim.lr=1e400' is inf" in proc.stderr
    assert not (tmp_path / "run").exists()
