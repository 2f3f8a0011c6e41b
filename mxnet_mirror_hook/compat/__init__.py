"""Compatibility layers for code written against other tools: :mod:`.memonger` keeps the seed
memonger's functions (``from mxnet_mirror_hook import memonger`` still works)."""
