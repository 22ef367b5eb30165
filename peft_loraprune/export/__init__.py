"""Making the model really smaller: merge the adapter, remove what the masks prune, write a plain checkpoint.

:func:`export_pruned_model` works on a model in memory (:mod:`.merge`); :func:`stream_export` reads and writes
safetensors shards one tensor at a time (:mod:`.streaming`, the command line's default). Both plan with
:mod:`.plan` and merge with :meth:`LoRAPruneLayer.masked_merged_weight`.
"""

from .merge import ExportReport, export_pruned_model

__all__ = ["ExportReport", "export_pruned_model"]
