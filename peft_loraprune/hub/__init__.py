"""What leaves the process: saved adapter folders and their integrity digests, model cards, Hub uploads,
sparsity reports, evaluation records, and loading an adapter onto a meta-device skeleton.

Imports the tuner's modules (config, layer, lookup); the tuner imports this layer only lazily.
"""

from .push import push_to_hub

__all__ = ["push_to_hub"]
