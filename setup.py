"""Setup shim: the configuration lives in setup.cfg; this adds the optional compiled replay.

``mxnet_mirror_hook/core/_replay.c`` speeds up the planner's search (NOTE [ the compiled
replay ] in core/allocator.py).  It is optional: without a C compiler the install goes on and
the planner uses the same walk in Python (same plans, slower).
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("mxnet_mirror_hook.core._replay", ["mxnet_mirror_hook/core/_replay.c"],
                             extra_compile_args=["-O2"], optional=True)])
