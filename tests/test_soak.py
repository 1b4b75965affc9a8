"""benchmarks/soak.py smoke run: one randomized kill trial, then resume; refused-or-identical."""

import json
import sys

import pytest

from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_one_soak_trial_ends_refused_or_identical(tiny_world, tmp_path):
    sys.path.insert(0, str(REPO))
    from benchmarks import soak

    out = tmp_path / "soak.json"
    with pytest.raises(SystemExit) as e:
        soak.main(["--trials", "1", "--modes", "cache", "--seed", "3", "--world", str(tiny_world.root),
                   "--workdir", str(tmp_path / "soak"), "--out", str(out)])
    report = json.loads(out.read_text())
    assert e.value.code == 0 and set(report["verdicts"]) <= {"identical", "refused", "missed"}, report
