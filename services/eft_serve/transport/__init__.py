"""Transports: thin layers that carry engine and coordinator calls (in-process, gRPC)."""
