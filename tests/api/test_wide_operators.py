"""Operators of many outputs (an unrolled LSTM's input split by one SliceChannel) plan under
every option set: the compiled replay has no fixed limit on outputs."""
from __future__ import annotations

import pytest

from mxnet_mirror_hook import plan_mirror
from mxnet_mirror_hook.core import allocator
from mxnet_mirror_hook.testing.models import lstm_language_model

STEPS = 100
DATA = [("data", (16, STEPS))]
LABEL = [("softmax_label", (16, STEPS))]


@pytest.fixture(scope="module")
def unrolled_lm():
    """A 100-step unrolled LSTM language model: ``embed`` split by one 100-output SliceChannel."""
    return lstm_language_model(STEPS, vocab=100, num_embed=32, num_hidden=32, num_layers=1)


@pytest.mark.parametrize("backend", ["mirror", "auto"])
def test_a_100_step_unrolled_lstm_plans_under_min_with_the_compiled_replay(unrolled_lm, backend,
                                                                            monkeypatch):
    models = []
    original = allocator.AllocatorModel.__init__

    def recording(self, graph):
        original(self, graph)
        models.append(self)

    monkeypatch.setattr(allocator.AllocatorModel, "__init__", recording)
    plan = plan_mirror(unrolled_lm, DATA, LABEL, memory_budget="min", backend=backend)
    assert plan.planned_mb <= plan.baseline_mb
    assert plan.mirrored
    widest = max(len(n.output_bytes) for m in models for n in m.graph.nodes)
    assert widest == STEPS
    if allocator._replay is not None:
        assert any(m._compiled is not None for m in models)
