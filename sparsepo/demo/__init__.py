"""The embedded offline demo world (a small replica of the DPO paper's controlled-sentiment task).

    from sparsepo.demo import prepare_world, evaluate_policy, ground_truth_reward

    world = prepare_world("runs/demo/world")                 # tokenizer, SFT model, pairs; cached
    # ... train a policy on world.train_path starting from world.sft_dir ...
    stats = evaluate_policy("runs/dpo/final", world.sft_dir, world.eval_prompts_path)
    stats["win_rate"], stats["kl"]

Imports stay light: `ground_truth_reward` (pure Python) is imported eagerly, while `prepare_world`,
`evaluate_policy` and `WorldPaths` are resolved on first use (PEP 562), because their modules import
torch, which takes seconds; `import sparsepo.demo` just to score text should not pay for that.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sparsepo.demo.reward import ground_truth_reward, normalized_reward

if TYPE_CHECKING:
    from sparsepo.demo.evaluate import evaluate_policy, win_rate
    from sparsepo.demo.world import WorldPaths, prepare_world

__all__ = ["prepare_world", "WorldPaths", "evaluate_policy", "win_rate", "ground_truth_reward",
           "normalized_reward"]

_LAZY = {"prepare_world": "sparsepo.demo.world", "WorldPaths": "sparsepo.demo.world",
         "evaluate_policy": "sparsepo.demo.evaluate", "win_rate": "sparsepo.demo.evaluate"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sparsepo.demo' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
