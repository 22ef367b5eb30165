"""Deciding what to prune: the architecture registry (one entry per family), structured groups, importance
criteria, selection under a budget, the schedule, and the engine that ties them to an adapter's layers.

Imports the kernels and :mod:`peft_loraprune.layer`; never the tuner, the callback, export or the hub layer.
"""
