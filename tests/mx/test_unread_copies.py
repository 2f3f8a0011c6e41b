"""Recomputed copies nothing reads (NOTE [ copies nothing reads ] in core/liveness.py): MXNet's
convolution without MKLDNN refuses them, so a process without MKLDNN binds plans without them."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap


import mxnet_mirror_hook.planning.one_level as plan_module
from mxnet_mirror_hook import plan_mirror
from mxnet_mirror_hook.core.planners import Decision, register_planner
from mxnet_mirror_hook.core.planners.base import Planner
from mxnet_mirror_hook.testing.models import small_resnet
from tests.paths import ROOT

SHAPES = [("data", (16, 3, 64, 64))]


def _dead_convolution(graph, mirrored):
    """A kept convolution whose every consumer is a kept BatchNorm: mirrored on top of
    ``mirrored``, its copy is unread."""
    consumers = graph.consumers()
    for index, node in enumerate(graph.nodes):
        if node.op == "Convolution" and node.name not in mirrored and consumers[index] and all(
                graph.nodes[c].op == "BatchNorm" and graph.nodes[c].name not in mirrored
                for c in consumers[index]):
            return node.name
    raise AssertionError("no kept convolution feeding only kept BatchNorms")


@register_planner("test-dead-copy")
class DeadCopyPlanner(Planner):
    """``auto``'s plan (set in :attr:`base` first) plus one convolution whose copy is unread."""

    name = "test-dead-copy"
    base: frozenset = frozenset()

    def propose(self, graph):
        conv = _dead_convolution(graph, DeadCopyPlanner.base)
        return [Decision(DeadCopyPlanner.base | {conv}, "auto's plan and an unread copy")]


def _prepare():
    DeadCopyPlanner.base = frozenset(plan_mirror(small_resnet(4, 16), SHAPES, cache_dir=False).mirrored)


def test_without_mkldnn_the_bound_plan_leaves_unread_copies_out(monkeypatch):
    from mxnet_mirror_hook.plan import prepare_planning

    _prepare()
    conv = _dead_convolution(prepare_planning(small_resnet(4, 16), SHAPES).graph, DeadCopyPlanner.base)
    with_mkldnn = plan_mirror(small_resnet(4, 16), SHAPES, planner="test-dead-copy", cache_dir=False)
    assert conv in with_mkldnn.mirrored  # MKLDNN (this build's default) runs such copies
    monkeypatch.setattr(plan_module, "_cpu_runs_unread_copies", lambda: False)
    without = plan_mirror(small_resnet(4, 16), SHAPES, planner="test-dead-copy", cache_dir=False)
    assert conv not in without.mirrored and len(without.mirrored) > 0
    attrs = without.symbol.attr_dict()
    assert attrs.get(conv, {}).get("__force_mirroring__") != "True"


def test_a_plan_with_an_unread_convolution_copy_trains_without_mkldnn():
    code = textwrap.dedent(f"""
        import mxnet as mx
        import tests.mx.test_unread_copies as t  # registers the planner
        from mxnet_mirror_hook import MirroredModule
        t._prepare()
        from mxnet_mirror_hook.testing.models import small_resnet
        module = MirroredModule(small_resnet(4, 16), planner="test-dead-copy", cache_dir=False)
        module.bind({SHAPES!r}, [("softmax_label", (16,))])
        module.init_params(mx.init.Xavier())
        module.forward_backward(mx.io.DataBatch([mx.nd.ones((16, 3, 64, 64))], [mx.nd.zeros((16,))]))
        mx.nd.waitall()
        print("trained", len(module.mirror_plan.mirrored))
    """)
    env = dict(os.environ, MXNET_MKLDNN_ENABLED="0", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained" in done.stdout
    assert "copy nothing reads" in done.stderr  # the warning says what was left out and why


def test_mxnet_without_mkldnn_refuses_an_unread_convolution_copy():
    # The reason for all this, measured: the same decision bound as it is fails in backward.
    code = textwrap.dedent(f"""
        import mxnet as mx
        import tests.mx.test_unread_copies as t
        from mxnet_mirror_hook.plan import prepare_planning
        from mxnet_mirror_hook.testing.models import small_resnet
        setup = prepare_planning(small_resnet(4, 16), {SHAPES!r})
        t._prepare()
        decision = t.DeadCopyPlanner().propose(setup.graph)[0]
        executor = setup.template.build(decision.mirrored).simple_bind(
            mx.cpu(), data=(16, 3, 64, 64), softmax_label=(16,))
        for array in executor.arg_arrays:
            array[:] = 0.1
        try:
            executor.forward(is_train=True)
            executor.backward()
            mx.nd.waitall()
            print("ran")
        except mx.base.MXNetError as error:
            print("refused" if "kWriteTo" in str(error) else "other error")
    """)
    env = dict(os.environ, MXNET_MKLDNN_ENABLED="0", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert done.stdout.split()[-1] == "refused", done.stdout + done.stderr[-1000:]
