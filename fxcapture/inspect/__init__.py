"""Looking at a capture: the graph as networkx (``graph``), its drawing (``draw``) and
attention / feature pictures (``viz``). networkx and matplotlib load only here.

May import ``core`` and ``_util``; nothing from ``dataset``, ``compat`` or ``cli``.
"""
