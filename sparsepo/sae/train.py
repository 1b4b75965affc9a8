"""Train an SAE on cached activations with sae-lens' training SAE classes, in one short loop.

sae-lens' own runner wants a model and a token stream; FPO already has the activations
(`collect_activations`), so we drive `TrainingSAE.training_forward_pass` directly, as sae-lens'
SAETrainer does: Adam, gradient-norm clip 1.0, dead-feature mask for TopK's auxiliary loss, linear
learning-rate decay over the last 20% of steps. Inputs are scaled to mean norm √d_in while
training (sae-lens' "expected_average_only_in") and the scale is folded back into the weights, so
the returned SAE reads raw activations.

    sae, stats = train_sae(acts, d_sae=16 * acts.shape[1], k=32, steps=2000)
"""

from __future__ import annotations

import math
import time

import torch

from sparsepo.sae.features import reconstruction_stats

ARCHITECTURES = ("topk", "jumprelu")


def _training_sae(architecture: str, d_in: int, d_sae: int, k: int, device: str, l0_coefficient: float):
    import sae_lens

    if architecture == "topk":
        cfg = sae_lens.TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k, device=device, dtype="float32")
        return sae_lens.TopKTrainingSAE(cfg)
    if architecture == "jumprelu":
        # Gemma Scope 2's quadratic L0 penalty around a target of k active features, so k means
        # the same thing for both architectures. The straight-through gradient also reaches the
        # encoder (Anthropic's setup): with it alone on the threshold, L0 fell to only ~2k in 1000
        # steps on the tiny test model; with it, to ~k. A threshold init of 0.5+ killed every feature.
        cfg = sae_lens.JumpReLUTrainingSAEConfig(
            d_in=d_in, d_sae=d_sae, device=device, dtype="float32", jumprelu_sparsity_loss_mode="quadratic",
            target_l0=float(k), l0_coefficient=l0_coefficient, jumprelu_init_threshold=0.1,
            jumprelu_bandwidth=0.05, jumprelu_ste_to_input=True)
        return sae_lens.JumpReLUTrainingSAE(cfg)
    raise ValueError(f"architecture={architecture!r} is not supported: use one of {', '.join(ARCHITECTURES)}")


def _to_inference(training_sae):
    """The inference SAE (TopKSAE / JumpReLUSAE) that `save_inference_model` + `load_from_disk` would give."""
    from sae_lens import SAE

    state = {name: t.detach().clone() for name, t in training_sae.state_dict().items()}
    training_sae.process_state_dict_for_saving_inference(state)  # TopK: folds decoder norms
    sae = SAE.from_dict(training_sae.cfg.get_inference_sae_cfg_dict())
    sae.load_state_dict(state)
    return sae


def train_sae(activations: torch.Tensor, *, d_sae: int, k: int, architecture: str = "topk",
              steps: int = 2000, lr: float = 4e-4, batch_size: int = 4096, seed: int = 0,
              dead_window: int = 200, l0_coefficient: float = 1.0, eval_tokens: int = 65536,
              progress: bool = True):
    """Train on `activations` (M,D); returns (frozen inference SAE, stats).

    Trains on `activations`' device. `l0_coefficient` weighs JumpReLU's L0 penalty (unused by TopK).
    stats: explained_variance and l0 of the returned SAE on (up to `eval_tokens` of) the
    activations, final_loss, dead_features, steps, seconds. The caller's RNG state is untouched.
    """
    from sae_lens.saes.sae import TrainStepInput
    from tqdm.auto import tqdm

    if activations.ndim != 2:
        raise ValueError(f"activations must be (tokens, d_in), got shape {tuple(activations.shape)}")
    if not 0 < k <= d_sae:
        raise ValueError(f"k={k} must be in 1..d_sae={d_sae}")
    x_all = activations.detach().float()
    m, d_in = x_all.shape
    scale = math.sqrt(d_in) / x_all.norm(dim=-1).mean().clamp(min=1e-12).item()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Built on the CPU so the seed fixes the init whatever the device, then moved.
        sae = _training_sae(architecture, d_in, d_sae, k, "cpu", l0_coefficient).to(x_all.device)
        with torch.no_grad():
            sae.b_dec.copy_((x_all * scale).mean(0))  # start the decoder bias at the data mean

    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    decay_from = int(0.8 * steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 1.0 if s < decay_from else max(0.0, (steps - s) / max(1, steps - decay_from)))
    coefficients = {name: (c.value if hasattr(c, "value") else float(c))
                    for name, c in sae.get_coefficients().items()}
    since_fired = torch.zeros(d_sae, device=x_all.device)
    sae.train()
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(steps), desc=f"train SAE ({architecture}, d_sae={d_sae}, k={k})", disable=not progress)
    for step in bar:
        idx = torch.randint(m, (min(batch_size, m),), generator=gen).to(x_all.device)
        out = sae.training_forward_pass(TrainStepInput(
            sae_in=x_all[idx] * scale, coefficients=coefficients, dead_neuron_mask=since_fired > dead_window,
            n_training_steps=step, is_logging_step=False))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        with torch.no_grad():
            since_fired += 1
            since_fired[(out.feature_acts != 0).any(dim=0)] = 0
        loss = out.loss.detach()
        if progress and step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4g}")

    with torch.random.fork_rng(devices=[]):
        sae_inf = _to_inference(sae)
    sae_inf.fold_activation_norm_scaling_factor(scale)  # read raw activations from now on
    sae_inf.requires_grad_(False).eval()
    sae_inf.sparsepo_meta = {}
    sae_inf.sparsepo_source = "train_sae"
    ev_idx = torch.randperm(m, generator=gen)[:eval_tokens].to(x_all.device)
    rec = reconstruction_stats(sae_inf, x_all[ev_idx])
    stats = {
        "explained_variance": rec["explained_variance"],
        "l0": rec["l0"],
        "final_loss": loss.item(),
        "dead_features": int((since_fired > dead_window).sum().item()),
        "activation_scale": scale,
        "steps": steps,
        "seconds": time.perf_counter() - t0,
    }
    return sae_inf, stats
