"""API keys and per-key quotas: who may call, which recipes, exact mode, how much.

No Ray or gRPC; only `redis_quota_store` imports redis. `keys` loads the keys file (only sha256
hashes of keys are stored) and looks keys up; `quotas` is the per-replica concurrency +
tokens-per-minute limiter; `shared_quotas` shares those limits across coordinator replicas
through a store (`redis_quota_store`), falling back to per replica; `gate` holds the checks
(metadata -> key; key -> permissions -> quota lease) that `transport/admission.py` runs in order.
"""
