"""The config checks that need no process group, run where the command is typed, before a launcher.

    cfg = check_command(config, overrides, world_size=N)   # `sparsepo train/precompute --nproc N` (cli)
    cfg = check_command(config, overrides, world_size=W)   # again in each launched process (sparsepo.train)

A refusal then takes the seconds of one config read (no torch.distributed, no DeepSpeed, no
weights) whatever the number of processes, and exits 2 in every process layout: `CONFIG_ERRORS`
are the error classes that mean "this config cannot run" (a bad key or value, a stage file, a
topology, a method or model family live mode cannot serve). Each check is the function every mode
calls (`load_stage_file`, `build_deepspeed_config` with its batch split, `check_live_supported`,
`Topology.build`, `check_live_topology`), not a copy.
"""

from __future__ import annotations

from sparsepo.config import ConfigError, RunConfig, build_deepspeed_config, load_config
from sparsepo.config.ds_json import load_stage_file
from sparsepo.config.paths import check_local_inputs
from sparsepo.launch.topology import Topology, TopologyError
from sparsepo.reference.partition import PipelineConfigError, max_stages
from sparsepo.reference_role.server import LiveModeError, check_live_topology, live_model_paths

CONFIG_ERRORS = (ConfigError, TopologyError, PipelineConfigError, LiveModeError)
"""What a config that cannot run raises (UnsupportedModelError is a PipelineConfigError): exit code 2."""


def live_layers(cfg: RunConfig) -> int:
    """The most pipeline stages the live group's models allow, after refusing a model family the
    pipeline cannot split exactly. Reads the models' configs only (SePO: the checked oracle pair)."""
    from transformers import AutoConfig

    from sparsepo.logprobs.families import check_live_supported

    configs = [AutoConfig.from_pretrained(path) for path in live_model_paths(cfg)]
    for config in configs:
        check_live_supported(config)
    return max_stages(min(c.num_hidden_layers for c in configs))


def live_topology(cfg: RunConfig, world_size: int, ranks_per_node: int | None = None) -> Topology:
    """The live job's rank -> role map on `world_size` processes, checked (`ranks_per_node`: the
    launch's, as `launch.process.plan` builds it; None on one node)."""
    topo = Topology.build(cfg.topology, world_size, ranks_per_node=ranks_per_node, num_layers=live_layers(cfg))
    check_live_topology(topo)
    return topo


def check_router_aux(cfg: RunConfig) -> None:
    """model.router_aux_loss_coef: >= 0, and > 0 only for a mixture-of-experts policy (its config
    knows output_router_logits)."""
    coef = cfg.model.router_aux_loss_coef
    if coef < 0:
        raise ConfigError(f"model.router_aux_loss_coef={coef} must be >= 0 (0: off)")
    if coef > 0:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(cfg.model.path)
        if not hasattr(config, "output_router_logits"):
            raise ConfigError(f"model.router_aux_loss_coef={coef} needs a mixture-of-experts policy, but "
                              f"{cfg.model.path} is a {type(config).__name__} (no router): set it to 0")


def check_qlora(cfg: RunConfig) -> None:
    """QLoRA (lora.load_in_4bit) on a machine without CUDA or bitsandbytes: a config error with the reason."""
    from sparsepo.lora import check_runnable

    if problem := check_runnable(cfg):
        raise ConfigError(problem)


def check_run_tokenizer(cfg: RunConfig) -> None:
    """Every mode (cache, inline, live, precompute), before torch.distributed, DeepSpeed or any weights
    load: the models that will score the run's tokens share its tokenizer
    (`reference_role.offline.check_scorer_tokenizers`; a mismatch is a config error, exit 2)."""
    from sparsepo.losses import get_method
    from sparsepo.reference_role.offline import check_scorer_tokenizers

    spec = get_method(cfg.method.name, cfg.method.params)
    check_scorer_tokenizers(cfg, spec.reference_outputs, samples=spec.needs_policy_samples)


def check_run(cfg: RunConfig, world_size: int | None, ranks_per_node: int | None = None) -> None:
    """Raise one of CONFIG_ERRORS when `cfg` cannot run on `world_size` processes: the model and
    tokenizer directories, the scorers' tokenizers, the stage file, live mode's family and method, and — when `world_size`
    is known — the topology and the DeepSpeed JSON with its batch split over the policy ranks."""
    check_qlora(cfg)
    check_local_inputs(cfg)
    check_run_tokenizer(cfg)
    check_router_aux(cfg)
    load_stage_file(cfg.deepspeed.stage_file)
    live = cfg.reference.mode == "live"
    if world_size is None:  # the split is checked once the world is known (preflight)
        if live:
            live_layers(cfg)
        return
    dp = live_topology(cfg, world_size, ranks_per_node).num_policy if live else world_size
    build_deepspeed_config(cfg, dp_size=dp)


def check_command(config: str | None, overrides: list[str], *, world_size: int | None,
                  ranks_per_node: int | None = None) -> RunConfig:
    """`load_config` + `check_run`: the resolved config of a command line, or one of CONFIG_ERRORS."""
    cfg = load_config(config, overrides)
    check_run(cfg, world_size, ranks_per_node)
    return cfg
