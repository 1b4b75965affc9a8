"""The live reference group's DeepSpeed wiring: an eval-only ``PipelineModule`` over the stage
blocks of ``sparsepo.reference.stages`` (each rank builds only its own, ``StageLoader``), whose
``loss_fn`` is ``sparsepo.reference.scoring.ScoreFn``; and ``PipelineScorer``, which turns collated
batches into ``ReferenceOutputs`` through ``eval_batch``.

``build_pipeline`` groups the L+2 items into exactly ``num_stages`` contiguous blocks
(``partition.stage_parts`` decides where the cuts go) and hands DeepSpeed one block per stage (a
``PipelineModule`` with ``partition_method="uniform"`` over num_stages blocks puts block s on
stage s).

DeepSpeed facts this module relies on (deepspeed 0.19.8):
* ``PipelineModule`` always spans the whole ``torch.distributed`` world, split by
  ``PipeDataParallelTopology(num_pp=S, num_dp=R)``: axes ['pipe', 'data'], global rank
  ``stage * R + replica``. The world size must be a multiple of S.
* ``eval_batch(it, compute_loss=True, reduce_output=None, bcast_loss=False, num_micro_batches=n)``
  returns, on the last stage only, the list of per-micro-batch ``loss_fn`` outputs (None on other
  stages). Only the first and last stage read ``it`` (first: element 0 = inputs, last: element 1 =
  labels); middle stages never touch it. It starts with a world-wide barrier, so every rank of
  every replica must call it the same number of times.
* In eval the engine keeps adding each micro-batch's loss_fn output into ``engine.total_loss``
  (reset only by ``train_batch``): with outputs whose shape changes between batches the second
  ``eval_batch`` dies with a shape mismatch (and so does the second micro-batch of one batch whose
  rows do not split evenly, e.g. 3 + 2 rows). ``PipelineScorer.score`` resets it before and after,
  and ``ScoreFn`` clears it before returning each micro-batch's outputs (``after_micro_batch``), so
  only one micro-batch's outputs are ever accumulated, whatever their number and shapes.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from sparsepo.engine.collectives import on_every_rank
from sparsepo.reference.outputs import ReferenceOutputs
from sparsepo.reference.partition import PARTITIONS, PipelineConfigError, stage_parts
from sparsepo.reference.scoring import FEATURE_FIELDS, SCORE_FIELDS, SERVED_FIELDS, ScoreFn
from sparsepo.reference.stage_loader import StageLoader
from sparsepo.reference.stages import StageBlock, check_feature_layer


def _clear_total_loss(engine) -> None:
    engine.total_loss = None  # DeepSpeed adds the loss_fn output to it next: keep that to one micro-batch


def _block_spec(loader: StageLoader, lo: int, hi: int, feature_layer: int | None = None, chunk: int = 0):
    """A DeepSpeed LayerSpec whose build() loads items [lo, hi): only called on the owning stage."""
    from deepspeed.pipe import LayerSpec

    class _StageBlockSpec(LayerSpec):
        def __init__(self):
            super().__init__(StageBlock, [])
            self.bounds = (lo, hi)

        def build(self, log=False):
            return loader.build(lo, hi, feature_layer, chunk)

        def __repr__(self):
            return f"StageBlock(items [{lo}, {hi}))"

    return _StageBlockSpec()


def ds_inference_config(*, steps_per_print: int = 10**9) -> dict:
    """The minimal DeepSpeed config for an eval-only PipelineEngine: no optimizer, no ZeRO, no fp16/bf16
    (the stage weights are already in the wanted dtype)."""
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "steps_per_print": steps_per_print, "wall_clock_breakdown": False,
            "zero_optimization": {"stage": 0}}


def build_pipeline(model_path: str, *, num_stages: int, topk: int | None, precision: str = "fp32",
                   partition: str = "uniform", ds_config: dict | None = None, feature_layer: int | None = None,
                   features=None, requests: bool = False, chunk: int = 0, quantization=None):
    """A DeepSpeed PipelineEngine (eval only, no optimizer) over the current torch.distributed world.
    ``requests``: batches carry ``request_ids`` and the last stage adds request_logps (SPO's samples).
    ``quantization``: QLoRA's 4-bit reference (``StageLoader``).
    ``chunk`` > 0: the last stage scores by the lean log-prob path (model.logits_chunk, ``HeadStage``).

    World = num_stages x R data-parallel replicas (global rank = stage * R + replica). Initialises
    torch.distributed with ``deepspeed.init_distributed()`` when it is not yet (env:// variables).
    Each rank builds only its stage's items (see StageLoader). The engine's module (a
    PipelineModule, ``dynamic_shape=True``) has ``loss_fn = ScoreFn(...)``: ``eval_batch`` returns
    per-micro-batch ``ScoreFn`` tuples on the last stage.

    SAE features: ``feature_layer`` ℓ makes the stage holding decoder layer ℓ carry its output to
    the last stage; ``features`` is the frozen SAE wrapper there (``sparsepo.sae.runtime.SAEFeatures``: an
    object with ``.layer``, ``.k``, ``.reference(cap, batch)``), or a zero-argument callable
    returning one, called on the last stage only (so only the last stage loads the SAE). Given an
    object, ``feature_layer`` defaults to its layer. Every rank must pass the same ``feature_layer``.
    """
    from sparsepo.engine.dist import deepspeed  # its CPU backend without the shm op
    import torch.distributed as dist
    from deepspeed.pipe import PipelineModule

    if partition not in PARTITIONS:
        raise PipelineConfigError(f"pipeline partition {partition!r} is not one of {PARTITIONS}")
    if topk is not None and topk < 0:
        raise PipelineConfigError(f"pipeline reference: topk={topk} must be >= 0")
    loader = StageLoader(model_path, precision, quantization)
    if topk and topk > loader.config.vocab_size:
        raise PipelineConfigError(f"pipeline reference: topk={topk} > vocab size {loader.config.vocab_size}")
    load_features = None
    if features is not None:
        if callable(features) and not hasattr(features, "reference"):
            load_features = features
        else:
            load_features = lambda: features  # noqa: E731
            if feature_layer is None:
                feature_layer = features.layer
        if feature_layer is None:
            raise PipelineConfigError("pipeline reference: a features loader needs feature_layer")
    elif feature_layer is not None:
        raise PipelineConfigError("pipeline reference: feature_layer without features (the SAE for the last stage)")
    check_feature_layer(feature_layer, loader.num_layers)
    parts = stage_parts(loader.num_layers, num_stages, partition,
                        loader.item_params() if partition == "parameters" else None)
    if not dist.is_initialized():
        deepspeed.init_distributed()
    world = dist.get_world_size()
    if world % num_stages:
        raise PipelineConfigError(f"pipeline reference: world size {world} is not a multiple of "
                                  f"num_stages={num_stages} (world = stages x replicas)")
    specs = [_block_spec(loader, parts[s], parts[s + 1], feature_layer, chunk) for s in range(num_stages)]
    score_fn = ScoreFn(topk, feature_layer=feature_layer, requests=requests)
    module = PipelineModule(layers=specs, num_stages=num_stages, loss_fn=score_fn,
                            partition_method="uniform", dynamic_shape=True)
    module.eval()
    module.requires_grad_(False)
    if load_features is not None:
        # Only the last stage loads the SAE; a failure there must fail every rank (the others would
        # otherwise wait in deepspeed.initialize's collectives until the process-group timeout).
        def load_on_last_stage() -> None:
            if module.stage_id != num_stages - 1:
                return
            try:
                sae_features = load_features()
            except Exception as err:  # noqa: BLE001 - re-raised with the stage named, on every rank
                raise PipelineConfigError(f"pipeline reference: the last stage (rank {dist.get_rank()}) could not "
                                          f"load the SAE: {type(err).__name__}: {err}") from err
            if sae_features.layer != feature_layer:
                raise PipelineConfigError(f"pipeline reference: the SAE reads layer {sae_features.layer}, the "
                                          f"pipeline carries layer {feature_layer}")
            score_fn.features = sae_features

        on_every_rank(load_on_last_stage, what="pipeline reference: loading the SAE on the last stage")
    engine, _, _, _ = deepspeed.initialize(model=module, config=ds_config or ds_inference_config())
    engine.sparsepo_parts = parts
    score_fn.after_micro_batch = lambda: _clear_total_loss(engine)
    return engine


class PipelineScorer:
    """Scores collated batches through a pipeline engine from ``build_pipeline``.

    Every rank of the reference world calls ``score`` once per round (``eval_batch`` starts with a
    world-wide barrier); each replica scores its own batch. The first and the last stage of a
    replica need the batch (``needs_batch``); middle stages may pass None. The last stage returns
    ``ReferenceOutputs``, every other stage None. A batch's 2B rows are cut into ``micro_batches``
    row chunks that flow through the stages one after another (rows are independent, so results do
    not depend on the cut); 2B must be >= micro_batches (the count is fixed because middle stages,
    which never see the batch, must run the same schedule).

    With a feature layer (``build_pipeline(..., features=)``) the outputs also include
    ``FEATURE_FIELDS`` (feature_ids (2B,k), feature_values (2B,k)), computed on the last stage,
    which holds the SAE (``features``; None on the other stages).

    Hazards (they hang rather than fail): every rank of the reference world must call ``score`` the
    same number of times, replicas included (``eval_batch``'s world barrier is matched by *any*
    barrier, so a replica that skips a round pairs with another's next round or exit barrier); and
    a first/last stage that raises before ``eval_batch`` (e.g. the micro-batch check) leaves the
    other ranks waiting in that barrier until the process-group timeout.
    """

    def __init__(self, engine, *, micro_batches: int = 1, outputs: Sequence[str] | None = None):
        score_fn = engine.module.loss_fn
        topk = score_fn.topk  # the K the last stage computes (build_pipeline's topk)
        has_features = score_fn.feature_layer is not None
        if micro_batches < 1:
            raise PipelineConfigError(f"micro_batches={micro_batches} must be >= 1")
        if outputs is None:  # everything this engine computes
            outputs = SCORE_FIELDS + (FEATURE_FIELDS if has_features else ())
        unknown = [o for o in outputs if o not in SERVED_FIELDS]
        if unknown:
            raise PipelineConfigError(f"pipeline reference cannot produce {unknown}; it serves {SERVED_FIELDS}")
        if not has_features and any(o in FEATURE_FIELDS for o in outputs):
            raise PipelineConfigError(f"pipeline reference: {[o for o in outputs if o in FEATURE_FIELDS]} need an "
                                      f"SAE: build the pipeline with features= (and feature_layer=)")
        if not topk and any(o in ("topk_ids", "topk_logps") for o in outputs):
            outputs = tuple(o for o in outputs if o not in ("topk_ids", "topk_logps"))
        self.engine = engine
        self.topk = topk
        self.micro_batches = micro_batches
        self.outputs = tuple(outputs)
        self._topo = engine.module.topology()

    @classmethod
    def from_pretrained(cls, model_path: str, *, num_stages: int, topk: int | None, precision: str = "fp32",
                        partition: str = "uniform", micro_batches: int = 1,
                        outputs: Sequence[str] | None = None, feature_layer: int | None = None,
                        features=None, requests: bool = False, chunk: int = 0, quantization=None) -> "PipelineScorer":
        """``features``/``feature_layer``/``requests``: see ``build_pipeline`` (a loader callable keeps
        the SAE off every stage but the last)."""
        engine = build_pipeline(model_path, num_stages=num_stages, topk=topk, precision=precision,
                                partition=partition, feature_layer=feature_layer, features=features,
                                requests=requests, chunk=chunk, quantization=quantization)
        return cls(engine, micro_batches=micro_batches, outputs=outputs)

    @property
    def feature_layer(self) -> int | None:
        """The decoder layer whose output the pipeline carries to the SAE (None: no features)."""
        return self.engine.module.loss_fn.feature_layer

    @property
    def features(self):
        """The SAE wrapper (``SAEFeatures``) on the last stage; None on the others or without features."""
        return self.engine.module.loss_fn.features

    # --- who is who (ranks of the reference world) ---
    @property
    def num_stages(self) -> int:
        return self._topo.get_dim("pipe")

    @property
    def num_replicas(self) -> int:
        return self._topo.get_dim("data")

    @property
    def global_rank(self) -> int:
        return self.engine.global_rank

    @property
    def stage_id(self) -> int:
        return self._topo.get_coord(self.global_rank).pipe

    @property
    def replica_index(self) -> int:
        return self._topo.get_coord(self.global_rank).data

    @property
    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage_id == self.num_stages - 1

    @property
    def parts(self) -> list[int]:
        """Item bounds per stage: stage s holds items [parts[s], parts[s+1]) of the L+2."""
        return list(self.engine.sparsepo_parts)

    @property
    def stage_block(self) -> StageBlock:
        """This rank's stage (its `named_reference`: the parameters by the model's names)."""
        (block,) = [m for m in self.engine.module.modules() if isinstance(m, StageBlock)]
        return block

    @property
    def needs_batch(self) -> bool:
        return self.is_first_stage or self.is_last_stage

    def rank_of(self, stage: int, replica: int) -> int:
        return self._topo.get_rank(pipe=stage, data=replica)

    def stage_global_ranks(self, stage: int) -> list[int]:
        """Reference-world ranks of `stage`, indexed by replica."""
        return [self.rank_of(stage, r) for r in range(self.num_replicas)]

    def last_stage_global_ranks(self) -> list[int]:
        """Who sends results: the last stage of replica r is element r."""
        return self.stage_global_ranks(self.num_stages - 1)

    def first_stage_global_ranks(self) -> list[int]:
        return self.stage_global_ranks(0)

    # --- scoring ---
    def _micro_batches(self, batch) -> list[tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]]:
        """The data eval_batch reads: per micro-batch ((input_ids, attention_mask), (input_ids, response_mask))."""
        n = self.micro_batches
        rows = batch.input_ids.shape[0]
        if rows < n:
            raise PipelineConfigError(f"batch of {rows} rows cannot be cut into micro_batches={n}")
        ids = batch.input_ids.tensor_split(n)
        attn = batch.attention_mask.tensor_split(n)
        resp = batch.response_mask.tensor_split(n)
        if getattr(batch, "request_ids", None) is not None:  # SPO's samples: the ids the policy asks about
            req = batch.request_ids.tensor_split(n)
            return [((i, a), (i, r, q)) for i, a, r, q in zip(ids, attn, resp, req)]
        return [((i, a), (i, r)) for i, a, r in zip(ids, attn, resp)]

    @torch.no_grad()
    def score(self, batch) -> ReferenceOutputs | None:
        produced = self._run(batch)
        if produced is None:
            return None
        ro = ReferenceOutputs(example_ids=list(batch.example_ids))
        for name in self.outputs:
            setattr(ro, name, produced[name])
        return ro

    @torch.no_grad()
    def score_samples(self, batch, outputs: Sequence[str]) -> dict[str, Tensor] | None:
        """SPO: a sample batch (input_ids, attention_mask, response_mask = the sample mask, request_ids)
        -> {name: tensor} for `outputs` on the last stage, None elsewhere (a collective like `score`)."""
        produced = self._run(batch)
        return None if produced is None else {name: produced[name] for name in outputs}

    def _run(self, batch) -> dict[str, Tensor] | None:
        if self.needs_batch and batch is None:
            raise ValueError(f"stage {self.stage_id} (first or last) needs the batch; only middle stages may pass None")
        data = self._micro_batches(batch) if self.needs_batch else []  # middle stages never read it
        engine = self.engine
        engine.total_loss = None  # see module docstring: eval_batch accumulates into it
        engine.total_additional_losses = None
        try:
            per_micro = engine.eval_batch(iter(data), compute_loss=True, reduce_output=None, bcast_loss=False,
                                          num_micro_batches=self.micro_batches)
        finally:
            engine.total_loss = None
            engine.total_additional_losses = None
            engine.fwd_outputs = []
        if not self.is_last_stage:
            return None
        if len(per_micro) != self.micro_batches:
            raise RuntimeError(f"pipeline returned {len(per_micro)} micro-batch outputs, expected {self.micro_batches}")
        names = self.engine.module.loss_fn.fields
        if any(len(mb) != len(names) for mb in per_micro):
            raise RuntimeError(f"pipeline returned {[len(mb) for mb in per_micro]} outputs per micro-batch, "
                               f"expected {len(names)} ({names})")
        return {name: torch.cat([mb[j] for mb in per_micro]) for j, name in enumerate(names)}
