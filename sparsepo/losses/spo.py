"""SPO: Sharifnassab et al. 2024, "Soft Preference Optimization: Aligning Language Models to Expert
Distributions" (arXiv 2405.00747), §3: the SPO loss (preference loss + β·KL regulariser)."""

from __future__ import annotations

from dataclasses import dataclass

from sparsepo.losses.common import check, make_output, masked_mean, masked_sum, sigmoid_loss, sparse_kl
from sparsepo.losses.types import LossInputs, LossOutput

KL_ESTIMATORS = ("sequence", "token_mean")


@dataclass(kw_only=True)
class SPOParams:
    alpha: float = 1.0
    """α: the softmax exponent; the preference loss is −log softmax over {yw, yl} of α·log πθ(y)."""
    beta: float = 0.1
    """β: weight of KL(πθ ‖ πref) on policy samples (our default; its scale depends on kl_estimator)."""
    kl_estimator: str = "sequence"
    """How per-token KLs on the samples become one number: "sequence" (Σ over each sample's tokens,
    mean over samples: the sequence-level KL, default) or "token_mean" (mean over all sample tokens)."""

    def __post_init__(self) -> None:
        check(self.alpha > 0, "SPOParams", f"alpha must be > 0 (got {self.alpha})")
        check(self.beta >= 0, "SPOParams", f"beta must be >= 0 (got {self.beta}); 0 drops the KL term")
        check(self.kl_estimator in KL_ESTIMATORS, "SPOParams",
              f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)} (got {self.kl_estimator!r})")


def spo_loss(inputs: LossInputs, params: SPOParams) -> LossOutput:
    """SPO: a reference-free soft preference loss plus a KL regulariser over the policy's own outputs.

        loss_pair = −log σ(α·(log πθ(yw) − log πθ(yl)))          (= −log softmax_α over {yw, yl})
        KL        = E_{y~πθ} Σ_t KL(πθ(·|x,y<t) ‖ πref(·|x,y<t))   on S policy samples
        loss      = loss_pair + β·KL                             (KL is one batch scalar, added to every pair)

    Sharifnassab et al. 2024 (arXiv 2405.00747), §3, the SPO objective. Defaults α=1.0, β=0.1,
    kl_estimator="sequence".

    Reading of the estimator (knob `kl_estimator`): the paper regularises the KL between the
    policy's and the reference's whole output distributions. By the chain rule that sequence-level
    KL equals E_{y~πθ}[Σ_t KL_t], each KL_t taken over the vocabulary at a prefix of a policy sample;
    "sequence" estimates exactly that (Σ_t per sample, mean over samples), and "token_mean" is the
    per-token average (length-independent, β on a per-token scale). KL_t is `sparse_kl` on the
    reference's top-K ids + tail: a lower bound of the full-vocabulary KL. The gradient is the
    pathwise one (∇KL_t at fixed samples); the score-function term from sampling y ~ πθ is not
    included (the samples are treated as data, as is usual for on-sample KL penalties).

    Reads: policy_chosen_logps, policy_rejected_logps (B,); sample_mask (S,T') on generated tokens;
    ref_sample_topk_logps (S,T',K) and policy_sample_topk_logps (S,T',K) (the policy's log-probs at
    the reference's top-K ids). Rewards α·log πθ(y) (B,). Metrics: sample_kl (the KL estimate).
    """
    pw, pl, mask, ref, pol = inputs.require("spo", "policy_chosen_logps", "policy_rejected_logps",
                                            "sample_mask", "ref_sample_topk_logps", "policy_sample_topk_logps")
    if mask.shape[0] == 0:
        raise ValueError("method 'spo' needs at least one policy sample: sample_mask has S=0 rows.")
    token_kl = sparse_kl(pol, ref)
    if params.kl_estimator == "sequence":
        kl = masked_sum(token_kl, mask).mean()
    else:
        kl = masked_mean(token_kl.flatten(), mask.flatten())
    chosen, rejected = params.alpha * pw, params.alpha * pl
    losses = sigmoid_loss(chosen - rejected) + params.beta * kl
    return make_output(losses, chosen, rejected, sample_kl=kl)
