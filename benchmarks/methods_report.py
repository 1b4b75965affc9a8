"""The markdown block bench_methods.py writes into docs/benchmarks_methods.md (between BEGIN and END)."""

from __future__ import annotations

REFERENCE_SIDE = {"fpo": "offline cache: γ_ref + pooled SAE top-k", "simpo": "none",
                  "dpo": "cache: sequence log-probs", "tdpo2": "cache: per-token top-k distributions"}
BEGIN, END = "<!-- bench_methods:begin -->", "<!-- bench_methods:end -->"


def reference_side(method: str) -> str:
    """How the method's reference outputs reach the policy, for the table (any row of the loss table)."""
    if method in REFERENCE_SIDE:
        return REFERENCE_SIDE[method]
    from sparsepo.losses import get_method

    outputs = get_method(method).reference_outputs
    return "cache: " + ", ".join(outputs) if outputs else "none"


def fmt(x, spec=".1f", none="–"):
    return none if x is None else format(x, spec)


def render(res: dict) -> str:
    r, m = res["runs"], res["methods"]
    lines = [BEGIN, "", f"Measured {res['date']} on {res['machine']} — command:", "", "```",
             res["command"], "```", "",
             f"World `{res['size']}` ({res['world']['n_pairs']} pairs, d_model {res['world']['hidden_size']}, "
             f"{res['world']['num_layers']} layers, {res['world']['n_params']:,} parameters); "
             f"{res['steps']} steps of {res['global_batch']} pairs, nproc {res['nproc']}, "
             f"repeats {res['repeats']}; wall step times over steps 3..{res['steps']} of every repeat, CPU "
             f"time per step from the {res['steps']}-step run minus a {res['short_steps']}-step run. "
             f"FPO: SAE layer {res['fpo']['layer']}, d_sae {res['fpo']['d_sae']}, TopK "
             f"{res['fpo']['sae_k']}, {res['fpo']['sae_stats'].get('steps')} training steps "
             f"({res['fpo']['sae_stats'].get('seconds', float('nan')):.0f}s, explained variance "
             f"{res['fpo']['sae_stats'].get('explained_variance', float('nan')):.3f}), method.k "
             f"{res['fpo']['k']}; TDPO2: reference.topk {res['tdpo_topk']}. Load average "
             f"{res['load_before']} before, {res['load_after']} after.", "",
             "| method | reference side | CPU ms/step | × SimPO (CPU) | wall step ms median (mean) | "
             "× SimPO (wall median) | cache read ms/step | peak RSS MiB | ref cache B/pair | precompute s | "
             "train loss, mean of first 10 → last 10 steps |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    simpo = m["simpo"]

    def ratio(value: float, base: float) -> str:  # a CPU-time difference of two short runs can be <= 0
        return f"{value / base:.2f}" if base > 0 else "n/a"

    for name in res["order"]:
        s = m[name]
        lines.append(
            f"| {name} | {reference_side(s['method'])} | {s['cpu_ms_per_step']:.1f} | "
            f"{ratio(s['cpu_ms_per_step'], simpo['cpu_ms_per_step'])} | "
            f"{s['step_time_median_ms']:.1f} ({s['step_time_mean_ms']:.1f}) | "
            f"{s['step_time_median_ms'] / simpo['step_time_median_ms']:.2f} | {s['ref_wait_mean_ms']:.2f} | "
            f"{s['peak_rss_mib']:.0f} | {fmt(s['cache_bytes_per_pair'], ',.0f')} | {fmt(s['precompute_s'])} | "
            f"{s['loss_first10']:.4f} → {s['loss_last10']:.4f} |")
    lines += ["", "| method | win rate vs SFT (± se) | KL(policy‖ref) (± se) | reward (SFT) | length (SFT) |",
              "|---|---|---|---|---|"]
    for name in res["order"]:
        e = m[name]["eval"]
        lines.append(f"| {name} | {e['win_rate']:.3f} ± {e['win_rate_se']:.3f} | {e['kl']:.3f} ± {e['kl_se']:.3f} | "
                     f"{e['policy_reward']:.3f} ({e['reference_reward']:.3f}) | "
                     f"{e['policy_length']:.1f} ({e['reference_length']:.1f}) |")
    f = res["fpo"]
    lines += ["", f"FPO cache vs a dense per-token feature cache at layer {f['layer']}: "
                  f"{f['response_tokens_per_pair']:.1f} response tokens per pair × d_sae {f['d_sae']} × 4 B = "
                  f"{f['dense_bytes_per_pair']:,.0f} B/pair. FPO's whole cache: {f['cache_bytes_per_pair']:,.0f} "
                  f"B/pair = **{100 * f['ratio']:.2f}%** (target ≤ 5%); its feature entries alone (FPO − DPO cache) "
                  f"{f['feature_bytes_per_pair']:,.0f} B/pair = {100 * f['feature_ratio']:.2f}%. Raw tensor "
                  f"payload per pair: "
              + ", ".join(f"{k} {v:,.0f} B" for k, v in f["payload_bytes_per_pair"].items())
              + ".", ""]
    for name in res["order"]:
        fm = m[name]
        if "feature_mse_chosen_first_last" not in fm:
            continue
        variant = f" ({', '.join(fm['overrides'])})" if fm.get("overrides") else " (paper defaults)"
        lines += [f"{name}{variant} training signals, step 1 → last: feature MSE chosen "
                  + " → ".join(f"{v:.3g}" for v in fm["feature_mse_chosen_first_last"]) + ", rejected "
                  + " → ".join(f"{v:.3g}" for v in fm["feature_mse_rejected_first_last"])
                  + "; SAE explained variance on the policy's activations "
                  + " → ".join(f"{v:.3f}" for v in fm["sae_explained_variance_first_last"]) + "; union size "
                  + " → ".join(f"{v:.1f}" for v in fm["union_size_first_last"]) + ".", ""]
    t = res["targets"]
    lines += ["Targets:", "",
              f"- FPO cache ≤ 5% of dense: {100 * f['ratio']:.2f}% — **{'met' if t['cache_5pct'] else 'missed'}**",
              f"- FPO step time ≤ 1.10 × SimPO: {t['fpo_vs_simpo_cpu']:.2f}× in CPU time per step — "
              f"**{'met' if t['fpo_vs_simpo_cpu'] <= 1.10 else 'missed'}** (wall-clock median: "
              f"{t['fpo_vs_simpo_wall_median']:.2f}×)",
              f"- FPO step time < TDPO2: {t['fpo_vs_tdpo2_cpu']:.2f}× TDPO2 in CPU time per step — "
              f"**{'met' if t['fpo_vs_tdpo2_cpu'] < 1.0 else 'missed'}** (wall-clock median: "
              f"{t['fpo_vs_tdpo2_wall_median']:.2f}×)", ""]
    o = res.get("fpo_overhead")
    if o:
        lines += [f"FPO policy-side extra work per micro-batch of {o['micro_batch_pairs']} pairs "
                  f"({o['response_tokens']} response tokens, d_sae {o['d_sae']}; plain torch, 1 thread, median): "
                  f"forward+backward {o['policy_fwd_bwd_ms']:.1f} ms; with hook + SAE encode/pool + feature MSE "
                  f"{o['with_sae_features_ms']:.1f} ms (+{o['sae_features_extra_ms']:.1f} ms); the logged "
                  f"reconstruction statistics (second encode + decode) {o['reconstruction_stats_ms']:.1f} ms.", ""]
    lines += ["Per run (wall s / CPU s, incl. process start; CPU ms per step): " + "; ".join(
        f"{x['method']}#{x['repeat']} {x['wall_s']:.1f} / {x['cpu_s']:.1f}; {x['cpu_ms_per_step']:.1f}" for x in r)
              + f". Total {res['total_s'] / 60:.1f} min (world {res['world_s']:.0f}s, SAE {res['sae_s']:.0f}s; "
              "both cached for later runs).", "", END]
    return "\n".join(lines)
