"""The merge/sampling core: recipes, per-token logprob arithmetic, sampling, detokenisation, stops.

Pure computation over numpy arrays; imports no Ray, gRPC, Redis or torch.
"""
