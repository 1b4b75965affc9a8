"""`data.eos_at_cut` (issue 24): a response cut to fit ends in eos, as SePO's authors' code does, so the
oracle can still select a cut response's end; off by default (a cut response has no eos), and then the
tokenisation key is what it was before the option existed.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_sepo_eos_at_cut.py
"""

from types import SimpleNamespace

import pytest
import torch

from sparsepo.config import load_config
from sparsepo.data.rows import Settings, _finish, settings_key
from sparsepo.losses.inputs import eos_positions

pytestmark = pytest.mark.unit
EOS = 2
TOKENIZER = SimpleNamespace(eos_token_id=EOS, bos_token_id=None)


def test_a_cut_response_ends_in_eos_only_with_the_knob():
    """prompt 4 tokens, max_length 8: room 4. chosen [5, 6, 7] + eos fits (4); rejected [8, 9, 10, 11, 12]
    + eos is cut to [8, 9, 10, 11]: without the knob it has no eos; with it the 4th token becomes eos
    ([8, 9, 10, 2]). The chosen one, not cut, is the same either way."""
    prompt, chosen, rejected = [1, 3, 3, 3], [5, 6, 7], [8, 9, 10, 11, 12]
    plain = Settings(max_length=8, max_prompt_length=4, truncation="response_only")
    p, c, r, cut = _finish(prompt, chosen, rejected, TOKENIZER, plain)
    assert (c, r, cut) == ([5, 6, 7, EOS], [8, 9, 10, 11], True)
    ends = Settings(max_length=8, max_prompt_length=4, truncation="response_only", eos_at_cut=True)
    p, c, r, cut = _finish(prompt, chosen, rejected, TOKENIZER, ends)
    assert (p, c, r, cut) == (prompt, [5, 6, 7, EOS], [8, 9, 10, EOS], True)
    assert _finish(prompt, chosen, [8], TOKENIZER, ends)[1:] == ([5, 6, 7, EOS], [8, EOS], False)


def test_the_eos_of_a_cut_response_is_found_where_sepo_looks():
    """eos_positions (SePO's eos_mask) marks the overwritten last token of the cut response."""
    ids = torch.tensor([[1, 3, 8, 9, 10, EOS]])
    mask = torch.tensor([[0.0, 0, 1, 1, 1, 1]])
    assert eos_positions(ids, mask, EOS).tolist() == [[0, 0, 0, 0, 0, 1]]


def test_the_knob_off_keeps_the_tokenisation_key_and_defaults_off():
    tok = type("Tok", (), {"backend_tokenizer": None, "get_vocab": lambda self: {"a": 0}, "chat_template": None,
                           "bos_token_id": None, "eos_token_id": EOS,
                           "__call__": lambda self, text: {"input_ids": [0]}})()
    off = settings_key(tok, Settings(max_length=8, max_prompt_length=4, truncation="prompt_first"))
    assert "eos_at_cut" not in off
    on = settings_key(tok, Settings(max_length=8, max_prompt_length=4, truncation="prompt_first", eos_at_cut=True))
    assert on["eos_at_cut"] is True and on != off
    assert load_config().data.eos_at_cut is False
    assert load_config(None, ["data.eos_at_cut=true"]).data.eos_at_cut is True
