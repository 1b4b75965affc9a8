"""FPO's SAE reconstruction statistics are computed on log steps only (`MetricsLogger.due`), where they
are what they always were; the pooled features (the loss's input) do not depend on it."""

import pytest
import torch

from sparsepo.metrics import MetricsLogger
from sparsepo.sae.features import reconstruction_stats
from sparsepo.sae.runtime import SAEFeatures

pytestmark = pytest.mark.unit


class _Cfg:
    d_in, d_sae = 8, 16


class TinySAE(torch.nn.Module):
    """What pooled_features / reconstruction_stats read of an sae-lens SAE (no sae_lens import)."""

    def __init__(self):
        super().__init__()
        self.cfg = _Cfg()
        self.W_enc = torch.nn.Parameter(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)),
                                        requires_grad=False)

    def encode(self, x):
        return torch.relu(x @ self.W_enc)

    def decode(self, f):
        return f @ self.W_enc.T / 16


class _Cap:
    def __init__(self, hidden):
        self.hidden = hidden

    def take(self):
        return self.hidden


class _Batch:
    def __init__(self, mask):
        self.response_mask = mask


def test_log_steps_are_the_first_and_every_log_every_th_on_every_rank(tmp_path):
    m = MetricsLogger(tmp_path, total_steps=30, enabled=False, log_every=10)  # ranks > 0: disabled, same answer
    assert [s for s in range(1, 31) if m.due(s)] == [1, 10, 20, 30]
    assert all(MetricsLogger(tmp_path, total_steps=5, enabled=False, log_every=1).due(s) for s in range(1, 6))


def test_statistics_only_when_asked_and_unchanged_when_asked():
    sae = SAEFeatures.__new__(SAEFeatures)  # skip the fingerprint of a real sae-lens SAE
    sae.sae, sae.layer, sae.k = TinySAE(), 0, 4
    hidden = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(1), requires_grad=True)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0]] * 4, dtype=torch.float32)
    pooled_on, stats = sae.policy(_Cap(hidden), _Batch(mask), stats=True)
    pooled_off, none = sae.policy(_Cap(hidden), _Batch(mask), stats=False)
    assert none == {} and set(stats) == {"sae_explained_variance", "sae_l0"}
    assert torch.equal(pooled_on, pooled_off) and pooled_off.requires_grad
    want = reconstruction_stats(sae.sae, hidden.detach(), mask)
    assert stats["sae_explained_variance"] == want["explained_variance"] and stats["sae_l0"] == want["l0"]
    assert 0 < stats["sae_l0"] <= 16
