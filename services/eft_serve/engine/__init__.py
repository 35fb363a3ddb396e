"""Model engines: forward passes that turn token-id prefixes into next-token logprobs.

Imports no Ray, gRPC or Redis; transports wrap an engine, never the reverse.
"""
