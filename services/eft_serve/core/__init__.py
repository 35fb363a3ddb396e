"""The merge/sampling core: recipes, per-token logprob arithmetic, sampling, speculative-block
verification, detokenisation, stops.

Pure computation over numpy arrays; imports no Ray, gRPC, Redis or torch (and none of the
service's own layers but the engine's plain types and the errors — see the import contracts).
"""
