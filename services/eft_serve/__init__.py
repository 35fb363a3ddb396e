"""EFT Serve: emulated fine-tuning and LM up-scaling as a service.

The package is layered: ``core`` (merge/sampling math) and ``engine`` (model forward passes)
import no Ray, gRPC or Redis; ``transport``, ``cache`` and ``serve`` are thin layers over them.
"""

__version__ = "0.1.0"
