"""The thin MXNet adapter: the only code that talks to MXNet internals.

:mod:`.convert` turns a symbol and input shapes into a core graph,
:mod:`.apply` turns a decision back into a symbol with ``force_mirroring``
attributes, and :mod:`.measure` binds a symbol and reads MXNet's planned memory.
"""
