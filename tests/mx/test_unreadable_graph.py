"""A bind whose executed graph cannot be read from MXNet's report still gives MXNet's planned MB
(NOTE [ a figure without its graph ] in mx/text.py): the segment figure counts that segment's plan
whole instead of failing the segment path."""
from __future__ import annotations

import pytest

from mxnet_mirror_hook.errors import MeasurementError
from mxnet_mirror_hook.mx import text, worker


def test_an_unreadable_graph_keeps_the_planned_mb_on_the_error(monkeypatch):
    def unreadable(*args, **kwargs):
        raise MeasurementError("cannot tell which node is the graph output sum_grad(0)")

    monkeypatch.setattr(text, "parse_executed_graph", unreadable)
    with pytest.raises(text.UnreadableGraphError, match="sum_grad") as info:
        text.executed_graph_from_text("...\nTotal 37 MB allocated\n", "", 1, 16)
    assert info.value.planned_mb == 37.0
    assert isinstance(info.value, MeasurementError)


def test_the_worker_answers_an_unreadable_graph_with_the_figure_alone():
    reply = worker._unreadable_reply(text.UnreadableGraphError("cannot tell", 12.0))
    assert reply == {"ok": True, "executed": None, "mb": 12.0, "unreadable": "cannot tell"}


def test_a_segment_whose_graph_cannot_be_read_counts_its_plan_whole(monkeypatch):
    import mxnet as mx

    from mxnet_mirror_hook.mx.segments import measure

    class Worker:
        def exchange(self, request):
            return {"ok": True, "executed": None, "mb": 21.0, "unreadable": "cannot tell"}

    monkeypatch.setattr("mxnet_mirror_hook.mx.worker.get_capture_worker", lambda *a, **k: Worker())
    symbol = mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=4, name="fc")
    mb, blocks = measure._measure_segment(symbol, mx.cpu(), {"data": (2, 3)}, {}, {"data": "null"}, {})
    assert (mb, blocks) == (21.0, None)
