"""Ray Serve wiring: one application per model pool plus the coordinator application.

Thin: deployments hold an engine or an `EftCoordinator` and forward to the shared RPC bodies in
`eft_serve.transport`; this package owns only Ray-specific concerns (handles, batching,
gRPC-proxy status codes, the app builders and the local cluster).
"""
