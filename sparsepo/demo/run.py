"""The demo command's pieces that need no launcher: which reference the demo's SPO run uses, the last
value of an override, and the printed evaluation (`sparsepo.cli.cmd_demo` puts them together)."""

from __future__ import annotations


def print_eval(result: dict, label: str) -> None:
    print(f"\nrewards scored by {result.get('reward', 'the demo lexicon')}")
    print(f"{label}: win rate vs reference {result['win_rate']:.1%} | KL(policy||ref) {result['kl']:.3f} | "
          f"reward {result['policy_reward']:.3f} (reference {result['reference_reward']:.3f}) | "
          f"length {result['policy_length']:.1f} (reference {result['reference_length']:.1f}) | "
          f"ended {result['policy_ended_fraction']:.1%} (reference {result['reference_ended_fraction']:.1%}) | "
          f"n={result['n']}")
    if result["policy_ended_fraction"] < 0.5 <= result["reference_ended_fraction"]:
        print(f"warning: only {result['policy_ended_fraction']:.0%} of the policy's samples end within "
              f"{result['max_new_tokens']} tokens: it has drifted from the reference, and its win rate and KL "
              f"describe run-on samples (for SePO see docs/benchmarks_sepo_spo.md)")


# SPO's samples are drawn during training, so no cache can hold their reference scores: the demo serves
# them from a live 2-stage pipeline reference group, one step stale (the group scores round t while the
# policy trains on round t-1; docs/bench_spo_overlap.json). `reference.mode=inline` scores them on the
# policy ranks instead; `topology.reference_ranks=N` (a multiple of pipeline_stages) resizes the group.
DEMO_LIVE = ("reference.mode=live", "topology.reference_ranks=2", "topology.pipeline_stages=2", "generation.staleness=1")


def last_override(overrides: list[str], key: str) -> str | None:
    values = [o.split("=", 1)[1] for o in overrides if o.startswith(key + "=")]
    return values[-1] if values else None


def demo_reference(needs_samples: bool, nproc: int, overrides: list[str]) -> tuple[list[str], int]:
    """(overrides the demo adds, processes to launch): for SPO a live reference group whose ranks come on
    top of the `nproc` policy ranks, unless the command line chose another reference mode."""
    mode = last_override(overrides, "reference.mode")
    if not needs_samples or mode not in (None, "live"):
        return [], nproc
    given = {o.split("=", 1)[0] for o in overrides}
    added = [o for o in DEMO_LIVE if o.split("=", 1)[0] not in given]
    reference_ranks = int(last_override([*DEMO_LIVE, *overrides], "topology.reference_ranks"))
    return added, nproc + reference_ranks
