"""`sparsepo export` writes a model card (OUT/README.md): base model, method and parameters, data
fingerprint, steps, and the finished run's final metrics; a checkpoint of an unfinished run says so."""

from __future__ import annotations

import json

import pytest
import yaml

from sparsepo.export import export_checkpoint
from test_export import project  # noqa: F401  (the fixture)

pytestmark = pytest.mark.unit


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_card_names_base_model_method_data_steps_and_final_metrics(project):  # noqa: F811
    summary = {"final": {"loss": 0.51234, "rewards/accuracies": 0.75}, "eval": {"loss": 0.6, "rewards/margins": 0.25}}
    (project.run / "summary.json").write_text(json.dumps(summary))
    done = export_checkpoint(project.run, project.root / "out")
    card = (done.out / "README.md").read_text()
    front = front_matter(card)
    assert front["base_model"] == done.source_model and front["tags"] == ["sparsepo", "dpo"]
    assert "with **dpo**" in card and "(4 optimiser steps, 16 pairs seen)" in card
    assert f"`{'d' * 64}`" in card  # the data fingerprint
    assert "| loss | 0.5123 | 0.6 |" in card and "| rewards/accuracies | 0.75 |  |" in card
    assert "| rewards/margins |  | 0.25 |" in card


def test_card_of_an_unfinished_run_has_no_metrics(project):  # noqa: F811
    done = export_checkpoint(project.run / "checkpoints" / "step-00000002", project.root / "out2")
    card = (done.out / "README.md").read_text()
    assert "had not finished" in card and "(2 optimiser steps" in card


def test_push_to_hub_without_a_network_says_so_and_keeps_the_export(project, monkeypatch, capsys):  # noqa: F811
    from sparsepo import cli

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(project.run), str(project.root / "out3"), "--push-to-hub", "me/tiny"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "pushing" in err and "to the Hub repo me/tiny failed" in err
    assert (project.root / "out3" / "README.md").is_file()
