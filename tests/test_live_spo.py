"""Live SPO: the policy's samples go over the bridge as REQUESTs to a pipeline-parallel reference
group, which scores them with the one scoring function and returns OUTPUTS. Synchronous
(staleness 0) must equal inline per step; staleness s uses the round drawn s steps earlier."""

import pytest

from conftest import read_scalars, run_training

pytestmark = pytest.mark.distributed
STEPS = 4
SPO = ("method.name=spo", "generation.max_new_tokens=8", "optim.lr=1e-2", "optim.schedule=constant",
       "optim.warmup_steps=0", "train.micro_batch_size=2", f"train.max_steps={STEPS}", "method.kl_support=union")


@pytest.fixture(scope="module")
def inline_run(tiny_world, tmp_path_factory):
    run = tmp_path_factory.mktemp("spo_inline")
    run_training(tiny_world, run, *SPO, "reference.mode=inline")
    return run


def test_live_synchronous_equals_inline(tiny_world, inline_run, tmp_path):
    """1 policy rank + a 2-stage reference pipeline (3 processes): the request reaches the first and
    the last stage, the last answers."""
    run_training(tiny_world, tmp_path, *SPO, "reference.mode=live", "topology.reference_ranks=2",
                 "topology.pipeline_stages=2", nproc=3)
    for tag in ("loss", "sample_kl", "kl_term", "sample_length"):
        live, inline = read_scalars(tmp_path, f"train/{tag}"), read_scalars(inline_run, f"train/{tag}")
        assert sorted(live) == sorted(inline) == list(range(1, STEPS + 1)), tag
        for step in live:
            assert live[step] == pytest.approx(inline[step], rel=1e-5, abs=1e-6), (tag, step, live, inline)
    assert set(read_scalars(tmp_path, "train/staleness").values()) == {0.0}
    assert read_scalars(inline_run, "train/sample_kl")[STEPS] > 1e-3  # the KL term is not trivially 0


@pytest.mark.slow  # default-time budget; the default keeps staleness (test_spo_resume[inline]) and the live transport (above)
def test_live_with_staleness_uses_older_rounds(tiny_world, inline_run, tmp_path):
    run_training(tiny_world, tmp_path, *SPO, "reference.mode=live", "topology.reference_ranks=1",
                 "generation.staleness=1", nproc=2)
    assert read_scalars(tmp_path, "train/staleness") == {1: 0.0, 2: 1.0, 3: 1.0, 4: 1.0}
    """Step 1 (index 0) uses round 0 like inline; step 2 reuses round 0 (same samples, support chosen by
    the step-0 policy) against the updated policy; round 1 (drawn by the same policy as inline's round 1,
    since step 1 was identical) regularises step 3."""
    live = {t: read_scalars(tmp_path, f"train/{t}") for t in ("loss", "sample_kl", "sample_length")}
    inline = {t: read_scalars(inline_run, f"train/{t}") for t in ("loss", "sample_length")}
    assert live["loss"][1] == pytest.approx(inline["loss"][1], rel=1e-5, abs=1e-6)
    assert abs(live["sample_kl"][1]) < 1e-6 and live["sample_kl"][2] > 1e-4
    assert live["sample_length"][2] == live["sample_length"][1]
    assert live["sample_length"][3] == inline["sample_length"][2]
