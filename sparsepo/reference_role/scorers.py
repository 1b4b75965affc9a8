"""What scores the reference side of a run, chosen once: the frozen reference, or SePO's oracle pair.

    scorer = scorer_for(cfg, outputs)      # the one place the choice is made
    scorer.check()                         # the tokenizer / vocabulary check, before anything loads
    scorer.name, scorer.model_paths()      # logs; the models a live group will hold
    scorer.fingerprints()                  # what it adds to the reference cache's key
    scorer.load(device)                    # cache and inline modes: a Head, or the OraclePair
    scorer.pipelines(...), scorer.wire     # live mode: the group's pipelines and what goes on the bridge

Each mode asks the object; none tests ``"oracle_scores" in outputs`` itself.
"""

from __future__ import annotations

from functools import cached_property

from sparsepo.config.paths import reference_path, run_tokenizer
from sparsepo.logprobs.head import Head, head_chunk


class ReferenceScorer:
    """The frozen reference (reference.path, else the policy's starting model)."""

    def __init__(self, cfg, outputs: tuple[str, ...], samples: bool = False):
        self.cfg, self.outputs, self.samples = cfg, outputs, samples
        self.path = reference_path(cfg)
        self.name = self.path

    def check(self) -> None:
        """A reference other than the policy's own model must share its tokenizer and vocabulary
        (the model FPO's SAE reads is this one too)."""
        from sparsepo.models import check_same_tokens

        if (self.outputs or self.samples) and self.path != self.cfg.model.path:
            check_same_tokens("reference", self.path, run_tokenizer(self.cfg), self.cfg.model.path)

    def model_paths(self) -> list[str]:
        return [self.path]

    def fingerprints(self) -> dict:
        """QLoRA's 4-bit reference (``quantized``); else nothing beyond the cache key's model part (the
        reference weights, ``offline.local_components``)."""
        return {"reference_quantized": "nf4-double-quant"} if self.quantized else {}

    @property
    def quantized(self) -> bool:
        """QLoRA (``lora.load_in_4bit``): the reference is loaded in 4-bit like the policy's base, so it
        is exactly the policy at step 0 in every mode (inline's adapters-off view is that base too)."""
        from sparsepo.lora import enabled

        return enabled(self.cfg.lora) and self.cfg.lora.load_in_4bit

    def quantization_config(self):
        """transformers' 4-bit config when ``quantized``, else None."""
        from sparsepo.lora import quantization_config

        return quantization_config(self.cfg.lora, self.cfg.train.precision) if self.quantized else None

    def load(self, device) -> Head:
        from sparsepo.models import load_frozen_model

        model = load_frozen_model(self.path, device=device, precision=self.cfg.train.precision,
                                  attn_implementation=self.cfg.model.attn_implementation,
                                  quantization=self.quantization_config())
        return Head.for_model(model, head_chunk(self.cfg))

    def pipelines(self, *, num_stages: int, topk: int | None, feature_layer: int | None, load_features):
        """The live group's pipeline over the reference (``engine.pipeline.PipelineScorer``)."""
        from sparsepo.engine.pipeline import PipelineScorer

        return PipelineScorer.from_pretrained(self.path, num_stages=num_stages, precision=self.cfg.train.precision,
                                              outputs=self.outputs, topk=topk, feature_layer=feature_layer,
                                              features=load_features, requests=self.samples,
                                              chunk=head_chunk(self.cfg), quantization=self.quantization_config())

    def wire(self, batch, records: list[dict], eos_id: int) -> list[dict]:
        """What the last stage sends the policy per batch: the records as scored."""
        return records


class OracleScorer:
    """SePO's oracle pair (reference.oracle): r_t = log π_oracle − log π_oracle_ref, no reference model."""

    def __init__(self, cfg, outputs: tuple[str, ...] = ("oracle_scores",)):
        self.cfg, self.outputs = cfg, outputs
        self.name = f"the SePO oracle pair in {cfg.reference.oracle}"

    @cached_property
    def manifest(self):
        """oracle.json, read and checked against the policy's tokenizer and vocabulary."""
        from sparsepo.reference.oracle import oracle_manifest

        return oracle_manifest(self.cfg)

    def check(self) -> None:
        self.manifest  # noqa: B018 - reading it runs the check

    def model_paths(self) -> list[str]:
        return [self.manifest.oracle, self.manifest.reference]

    def fingerprints(self) -> dict:
        """Both oracle models' weights key the cache."""
        from sparsepo.reference.oracle import oracle_fingerprints

        return oracle_fingerprints(self.manifest)

    def load(self, device):
        from sparsepo.reference.oracle import OraclePair

        return OraclePair.load(self.manifest, device=device, precision=self.cfg.train.precision,
                               chunk=head_chunk(self.cfg))

    def pipelines(self, *, num_stages: int, **_):
        """Two pipelines over the same stage ranks (``oracle_live.OraclePipelines``)."""
        from sparsepo.reference_role.oracle_live import OraclePipelines

        return OraclePipelines.build(self.manifest, num_stages=num_stages, precision=self.cfg.train.precision,
                                     chunk=head_chunk(self.cfg))

    def wire(self, batch, records: list[dict], eos_id: int) -> list[dict]:
        """The key tokens SePO trains on (``sepo_selection``), bit-packed, instead of r_t."""
        from sparsepo.reference_role.oracle_live import selection_records

        return selection_records(self.cfg.method.params, batch, records, eos_id)


def scorer_for(cfg, outputs: tuple[str, ...], *, samples: bool = False) -> ReferenceScorer | OracleScorer:
    """The one choice: the oracle pair when the method asks for oracle_scores, else the reference."""
    if "oracle_scores" in outputs:
        return OracleScorer(cfg, outputs)
    return ReferenceScorer(cfg, outputs, samples)
