"""Measured memory: MXNet's storage profiler over one training iteration, read as a timeline.

:func:`start_storage_profiler` starts the profiler with its storage counters on; after the
window, :func:`stop_storage_profiler` dumps the trace and :func:`read_memory_timeline` (or
:func:`profiler_peak_mb` for the peak alone) reads the ``Memory: cpu/0`` counter events,
whose ``args`` carry the running total of this process's NDArray storage on that device.
:func:`profile_iteration` trains one iteration (bind, ``init_params``, ``init_optimizer``,
forward, backward, update) plain or with a plan in a fresh subprocess and returns its
:class:`MemoryTimeline`; ``python -m mxnet_mirror_hook.mx.profile REQUEST.json`` is that
subprocess.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from ..core.units import MB

__all__ = ["MemoryTimeline", "PHASES", "END", "start_storage_profiler", "stop_storage_profiler", "mark_phase",
           "read_memory_timeline", "profiler_peak_mb", "train_one_iteration", "profile_iteration",
           "main"]

logger = logging.getLogger(__name__)

#: The phases of a profiled training iteration, in order (instant markers in the trace).
PHASES = ("bind", "init", "forward", "backward", "update")
#: The marker that closes the last phase.
END = "end"
#: The profiler domain the phase markers are recorded under.
_DOMAIN = "mxnet_mirror_hook"
Shapes = Sequence[Tuple[str, Tuple[int, ...]]]


@dataclass(frozen=True)
class MemoryTimeline:
    """The storage profiler's running total along one profiled window.

    Attributes
    ----------
    label : str
        What ran (``'plain'``, ``'mirrored'``).
    times_ms : tuple of float
        Milliseconds since the window's first event (the first phase marker when there is one).
    mb : tuple of float
        The running total at each time (MB; it starts at 0 when the profiler starts).
    phases : tuple of (str, float)
        Phase markers: name and milliseconds since the same origin (a profiled iteration's
        :data:`PHASES`, closed by :data:`END`).
    planned_mb : float
        MXNet's planned activation MB of what ran (0 when unknown).
    """

    label: str
    times_ms: Tuple[float, ...]
    mb: Tuple[float, ...]
    phases: Tuple[Tuple[str, float], ...] = ()
    planned_mb: float = 0.0

    @property
    def peak_mb(self) -> float:
        """The highest running total (MB; 0 without events)."""
        return max(self.mb, default=0.0)

    @property
    def peak_ms(self) -> float:
        """When the peak is first reached (ms)."""
        return self.times_ms[self.mb.index(self.peak_mb)] if self.mb else 0.0

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready dict (:meth:`from_dict` reads it back)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MemoryTimeline":
        """The timeline :meth:`to_dict` wrote."""
        return cls(label=data["label"], times_ms=tuple(data["times_ms"]), mb=tuple(data["mb"]),
                   phases=tuple((str(n), float(t)) for n, t in data.get("phases", ())),
                   planned_mb=float(data.get("planned_mb", 0.0)))


def start_storage_profiler(path: str) -> None:
    """Start MXNet's profiler with storage counters, to write its trace to ``path``.

    Start it before the first allocation to count (before ``bind``): the running total starts
    at 0, so memory allocated before the window and freed inside it counts negative.
    """
    import mxnet as mx

    mx.profiler.set_config(profile_memory=True, profile_symbolic=True, profile_imperative=True,
                           profile_api=False, aggregate_stats=False, filename=path)
    mx.profiler.set_state("run")


def stop_storage_profiler() -> None:
    """Stop the profiler and write its trace (to the path given at the start)."""
    import mxnet as mx

    mx.nd.waitall()
    mx.profiler.set_state("stop")
    mx.profiler.dump()


def mark_phase(name: str) -> None:
    """Record an instant marker ``name`` in the running profiler's trace."""
    import mxnet as mx

    mx.profiler.Marker(mx.profiler.Domain(_DOMAIN), name).mark("process")


def read_memory_timeline(path: str, label: str = "", device: str = "cpu/0",
                         planned_mb: float = 0.0) -> MemoryTimeline:
    """The ``Memory: <device>`` counter and the phase markers of a dumped trace, in time order."""
    with open(path, "r", encoding="utf-8") as handle:
        events = json.load(handle)["traceEvents"]
    name = f"Memory: {device}"
    counters = sorted((e["ts"], sum(e["args"].values())) for e in events if e.get("name") == name
                      and e.get("ph") == "C")
    markers = sorted((e["ts"], e["name"]) for e in events
                     if e.get("ph") == "n" and _DOMAIN in str(e.get("cat", "")))
    starts = [t for t, _ in counters[:1]] + [t for t, _ in markers[:1]]
    origin = min(starts) if starts else 0
    return MemoryTimeline(label=label, times_ms=tuple((t - origin) / 1e3 for t, _ in counters),
                          mb=tuple(v / MB for _, v in counters),
                          phases=tuple((n, (t - origin) / 1e3) for t, n in markers),
                          planned_mb=float(planned_mb))


def profiler_peak_mb(path: str, device: str = "cpu/0") -> float:
    """Stop the profiler, write its trace to ``path`` (as started) and return the peak (MB)."""
    stop_storage_profiler()
    return read_memory_timeline(path, device=device).peak_mb


# NOTE [ one profiled iteration ]
# What the window holds: bind, init_params (Xavier) and init_optimizer, a batch (uniform in
# [0, 1): valid as images and, floored, as token ids; labels 0), one forward, backward and
# update, so the running total climbs through the arrays the footprint names (parameters,
# Module's copies, gradients, optimizer state, inputs) before the activations.  Each phase
# ends with waitall() before the next marker: MXNet's engine runs asynchronously and a
# marker is stamped when Python reaches it, so without the wait a marker would land before
# the allocations of the phase it closes.  A mirrored run is planned (and its plan cached,
# in memory at least) by a module bound BEFORE the window and kept alive until after it:
# the profiler's total starts at 0, so memory allocated before the window and freed inside
# it would count negative (bench/bench_footprint.py measured Gluon peaks 0.2-1.2 GB low that
# way).  Each run needs its own process: binds leak native memory (NOTE [ why measurements
# run in a worker process ] in worker.py), and one process's profiler has one window.
def _batch(data: Shapes, labels: Shapes) -> Any:
    import mxnet as mx
    import numpy as np

    rng = np.random.RandomState(0)
    return mx.io.DataBatch([mx.nd.array(rng.uniform(0, 1, shape)) for _, shape in data],
                           [mx.nd.zeros(shape) for _, shape in labels])


def _make_module(symbol: Any, data: Shapes, labels: Shapes, options: Optional[Any]) -> Any:
    import mxnet as mx

    from ..module import MirroredModule
    data_names, label_names = [n for n, _ in data], [n for n, _ in labels]
    module = (mx.mod.Module(symbol, data_names=data_names, label_names=label_names) if options is None
              else MirroredModule(symbol, options=options, data_names=data_names, label_names=label_names))
    module.bind(list(data), list(labels) or None)
    return module


def train_one_iteration(symbol: Any, data: Shapes, labels: Shapes, path: str, *,
                        options: Optional[Any] = None, optimizer: str = "sgd",
                        optimizer_params: Optional[Mapping[str, Any]] = None,
                        label: str = "") -> MemoryTimeline:
    """One profiled training iteration in this process (NOTE [ one profiled iteration ]).

    Parameters
    ----------
    symbol : mx.sym.Symbol
        The training symbol.
    data, labels : sequence of (name, shape)
        Input shapes.
    path : str
        Where the profiler writes its trace.
    options : MirrorOptions, optional
        Train a ``MirroredModule`` with these options (``None``: a plain ``mx.mod.Module``).
    optimizer, optimizer_params
        As for ``Module.init_optimizer`` (default SGD, momentum 0.9).

    Raises
    ------
    MeasurementError
        If the profiled bind planned again (its planning binds would be counted).
    """
    import mxnet as mx

    from ..errors import MeasurementError
    from .text import parse_planned_mb
    params = dict({"learning_rate": 0.01, "momentum": 0.9} if optimizer_params is None else optimizer_params)
    planner = None if options is None else _make_module(symbol, data, labels, options)
    mx.nd.waitall()
    start_storage_profiler(path)
    mark_phase("bind")
    module = _make_module(symbol, data, labels, options)
    plan = getattr(module, "mirror_plan", None)
    if plan is not None and not plan.from_cache:
        stop_storage_profiler()
        raise MeasurementError("the profiled bind planned again: its peak would count planning binds")
    mx.nd.waitall()
    mark_phase("init")
    module.init_params(mx.init.Xavier())
    module.init_optimizer(optimizer=optimizer, optimizer_params=params)
    batch = _batch(data, labels)
    mx.nd.waitall()
    mark_phase("forward")
    module.forward(batch, is_train=True)
    mx.nd.waitall()
    mark_phase("backward")
    module.backward()
    mx.nd.waitall()
    mark_phase("update")
    module.update()
    mx.nd.waitall()
    mark_phase(END)
    stop_storage_profiler()
    planned = plan.planned_mb if plan is not None else parse_planned_mb(
        module._exec_group.execs[0].debug_str())
    del planner
    return read_memory_timeline(path, label=label, planned_mb=planned)


def _options_json(options: Any) -> Dict[str, Any]:
    """The options as JSON (a context by its device type, which the options read back)."""
    fields = options.as_dict()
    ctx = fields.get("cost_ctx")
    if ctx is not None and not isinstance(ctx, str):
        fields["cost_ctx"] = getattr(ctx, "device_type", str(ctx))
    fields["keep_ops"] = list(fields.get("keep_ops") or ())
    return fields


def profile_iteration(symbol: Any, data: Shapes, labels: Shapes = (), *, options: Optional[Any] = None,
                      label: Optional[str] = None, optimizer: str = "sgd",
                      optimizer_params: Optional[Mapping[str, Any]] = None,
                      timeout: float = 3600.0) -> MemoryTimeline:
    """:func:`train_one_iteration` in a fresh subprocess (with this process's environment, so
    ``MXNET_MKLDNN_ENABLED`` as here); its timeline.

    ``options`` (a :class:`~mxnet_mirror_hook.MirrorOptions`) trains with the plan; ``None``
    trains plain.  A plan already in the options' cache directory is loaded, not made again.

    Raises
    ------
    MeasurementError
        If the subprocess fails (the last lines of its standard error say why).
    """
    from ..errors import MeasurementError
    label = label or ("plain" if options is None else "mirrored")
    with tempfile.TemporaryDirectory(prefix="mirror-profile-") as folder:
        request: Dict[str, Any] = {
            "symbol": os.path.join(folder, "symbol.json"), "data": [[n, list(s)] for n, s in data],
            "labels": [[n, list(s)] for n, s in labels], "label": label,
            "options": None if options is None else _options_json(options),
            "optimizer": optimizer, "optimizer_params": optimizer_params,
            "trace": os.path.join(folder, "trace.json"), "result": os.path.join(folder, "result.json")}
        symbol.save(request["symbol"])
        request_path = os.path.join(folder, "request.json")
        with open(request_path, "w", encoding="utf-8") as handle:
            json.dump(request, handle)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)  # MXNET_MKLDNN_ENABLED and the rest as in this process
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        try:
            done = subprocess.run([sys.executable, "-m", "mxnet_mirror_hook.mx.profile", request_path],
                                  env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise MeasurementError(f"the profiled {label} iteration took over {timeout:.0f} s") from None
        if done.returncode or not os.path.exists(request["result"]):
            tail = " | ".join(done.stderr.strip().splitlines()[-5:])
            raise MeasurementError(f"the profiled {label} iteration failed (exit {done.returncode}): {tail}")
        with open(request["result"], "r", encoding="utf-8") as handle:
            found = MemoryTimeline.from_dict(json.load(handle))
    logger.info("%s: profiler peak %.1f MB over %.0f ms", label, found.peak_mb,
                found.times_ms[-1] if found.times_ms else 0.0)
    return found


def main(argv: Optional[List[str]] = None) -> int:
    """The subprocess of :func:`profile_iteration`: ``python -m mxnet_mirror_hook.mx.profile REQUEST``."""
    import mxnet as mx

    from ..options import MirrorOptions
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0], "r", encoding="utf-8") as handle:
        request = json.load(handle)
    options = None if request["options"] is None else MirrorOptions(**request["options"])

    def shapes(entries: Sequence[Sequence[Any]]) -> List[Tuple[str, Tuple[int, ...]]]:
        return [(str(n), tuple(int(d) for d in s)) for n, s in entries]

    found = train_one_iteration(mx.sym.load(request["symbol"]), shapes(request["data"]),
                                shapes(request["labels"]), request["trace"], options=options,
                                optimizer=request["optimizer"], optimizer_params=request["optimizer_params"],
                                label=request["label"])
    with open(request["result"], "w", encoding="utf-8") as handle:
        json.dump(found.to_dict(), handle)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
