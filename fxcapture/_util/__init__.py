"""Small helpers shared by every package: the one module of private torch machinery
(``internals``), one walk over nested values, atomic files.

Owns nothing of fxcapture's domain; imports nothing from the rest of fxcapture.
"""
