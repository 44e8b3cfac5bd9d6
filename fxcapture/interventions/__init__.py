"""Interventions built on capture: activation patching between two inputs.

(Edits inside the graph are a pass of ``core``.) May import ``core`` and ``_util``.
"""
