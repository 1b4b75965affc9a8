"""The reference role, above the engine: what the policy holds (`sources`), the live group's server,
cache mode and precompute (`offline`, `precompute`), SePO's oracle pipelines, and the run's scorer
(`scorers`). The model pieces they use (families, stages, scoring, outputs, cache) sit below, in
`sparsepo.reference` and `sparsepo.logprobs`. Import the submodules; this file imports nothing."""
