"""Tools on top of the public surfaces: the ``mxnet-mirror`` command line (:mod:`.cli`), the
memory-against-recomputation comparison (:mod:`.pareto`) and the live-memory report (:mod:`.report`)."""
