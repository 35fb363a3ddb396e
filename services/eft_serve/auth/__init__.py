"""API keys and per-key quotas: who may call, which recipes, exact mode, how much.

Pure: no Ray, gRPC or Redis. `keys` loads the keys file (only sha256 hashes of keys are stored)
and looks keys up; `quotas` is the per-key concurrency + tokens-per-minute limiter; `gate` is the
one admission check (metadata -> key -> permissions -> quota lease) that the transport calls.
"""
