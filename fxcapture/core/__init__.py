"""The capture engine: trace a model, name its values, select them, build the extractor.

Stages, each a module, imported in this order (a module imports only earlier ones):
``trace`` (the symbolic tracer), ``aliasing`` (in-place analysis), ``records`` (keys,
``@i`` calls, aliases), ``select`` (the selector grammar and its errors), ``spec``
(the request), ``passes`` (outputs, clones, pruning), ``attention`` and ``edit``
(graph rewrites), ``runtime`` (run-time capture), ``build`` (trace to program),
``extractor`` and ``api`` (the public entry points).

Imports nothing from ``dataset``, ``interventions``, ``inspect``, ``compat`` or ``cli``.
"""
