"""Datasets through a model: the loop (``run``), sources, reducers, device-to-host
copies, the on-disk store and ``torchrun`` sharding.

May import ``core`` and ``_util``; nothing from ``interventions``, ``inspect``,
``compat`` or ``cli``.
"""
