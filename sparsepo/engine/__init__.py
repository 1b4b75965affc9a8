"""The engine package: the only place in sparsepo that imports DeepSpeed.

    sparsepo.engine.collectives  one-rank / broadcast / gather-errors helpers (torch.distributed only)
    sparsepo.engine.dist         process-group start-up and clean shutdown (DeepSpeed's init)
    sparsepo.engine.policy       `PolicyEngine`: the ZeRO-3 policy; owns backward, step, lr, grad norm,
                                 save, load and gathering back into a Hugging Face directory
    sparsepo.engine.pipeline     the reference group's DeepSpeed PipelineModule scorer

Importing this package imports nothing heavy; each submodule imports what it needs.
"""
