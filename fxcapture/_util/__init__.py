"""Small helpers shared by every package: one walk over nested values, atomic files.

Owns nothing of fxcapture's domain; imports nothing from the rest of fxcapture.
"""
