"""The seed-compatible functions' old home: ``import mxnet_mirror_hook.memonger`` keeps working.

This module is :mod:`mxnet_mirror_hook.compat.memonger` itself (not a copy).
"""
import sys as _sys

from .compat import memonger as _memonger

_sys.modules[__name__] = _memonger
