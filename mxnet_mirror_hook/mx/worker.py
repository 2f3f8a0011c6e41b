"""A recycled subprocess that binds symbols and reports MXNet's planned memory.

# NOTE [ why measurements run in a worker process ]
# Measured with MXNet 1.9.1 on the CPU: every ``simple_bind`` of gluoncv's
# resnet152_v1b at batch 32 leaves about 50 MB resident after the executor
# and all its arrays are gone (no Python object survives ``gc.collect()``;
# ``malloc_trim`` and MXNet's pool settings do not help).  A planner binds
# tens of executors per plan, so an in-process planner grows by GBs over a
# training session.  Binding in a child process and restarting it once its
# resident memory passes a limit keeps both processes bounded.  It also turns
# a crash inside MXNet's bind into an error instead of killing training.
#
# Symbols with ``Custom`` operators are measured in-process: their Python
# implementations are registered only in the user's process.

Protocol: one JSON object per line each way.  Request: ``symbol`` (JSON text),
``shapes``, ``types``, ``grad_req``, ``ctx`` ([device type, id]), optionally
``capture: true``, and for the C API path ``device`` ([device type id, id]) and
``type_ids``.  Reply: ``{"ok": true, "mb": float, "rss": int, "via": "capi" | "package"}``
(with ``executed``, the executed graph's dict, when capturing) or
``{"ok": false, "error": str}``.  The child is started with the path of the MXNet library
the parent loaded and binds through MXNet's C API without importing the ``mxnet``
package (NOTE [ binding without the mxnet package ] in capi.py); a request that path
cannot serve is answered through the package, imported then.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .. import env
from ..core.units import MB
from ..errors import MeasurementError

__all__ = ["MeasureWorker", "WorkerPool", "get_pool", "get_capture_worker", "shutdown_workers",
           "worker_stats", "CAPTURE_SLOTS"]

logger = logging.getLogger(__name__)


class MeasureWorker:
    """Parent-side handle of one measuring subprocess.

    Parameters
    ----------
    max_resident_mb : float, optional
        Restart the child after a measurement leaves it above this size
        (default ``$MXNET_MIRROR_HOOK_WORKER_MAX_MB`` or 1536).
    verbose : bool
        Start the child with MXNet's memory-plan log on, so it can capture
        executed graphs (MXNet reads the switch once per process; it doubles
        the time of a bind of a large graph, so measuring workers leave it off).
    """

    def __init__(self, max_resident_mb: Optional[float] = None, verbose: bool = False,
                 environment: Optional[Dict[str, str]] = None) -> None:
        self.verbose = verbose
        self.environment = dict(environment or {})
        self.max_resident_mb = env.worker_max_mb() if max_resident_mb is None else max_resident_mb
        self.restarts = 0
        #: Processes started, requests answered (pings apart), and the CPU seconds the
        #: processes reported (start-up included; a process's last report counts).
        self.started = 0
        self.answered = 0
        self.cpu_seconds = 0.0
        self._process_cpu = 0.0
        self.last_resident_mb = 0.0
        self._process: Optional[subprocess.Popen[str]] = None
        self._lock = threading.Lock()
        self._sequence = 0
        self._answered = False  # the running child has answered (its MXNet import is done)
        self._pinging: Optional[threading.Thread] = None

    @property
    def ready(self) -> bool:
        """Whether the child runs and has answered a request since it started."""
        process = self._process
        return self._answered and process is not None and process.poll() is None

    def warm_in_background(self) -> None:
        """Start the child and wait for its first answer in a thread (no waiting here)."""
        if self.ready or (self._pinging is not None and self._pinging.is_alive()):
            return

        def ping() -> None:
            try:
                self.exchange({"ping": True})
            except MeasurementError as error:  # the next real request reports it
                logger.debug("measuring process did not start: %s", error)

        self._pinging = threading.Thread(target=ping, name="mirror-worker-start", daemon=True)
        self._pinging.start()

    def _start(self) -> subprocess.Popen[str]:
        self.started += 1
        self._process_cpu = 0.0
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        child_env = dict(os.environ)
        child_env["PYTHONPATH"] = package_root + os.pathsep + child_env.get("PYTHONPATH", "")
        child_env.update(self.environment)
        if self.verbose:
            # MXNet reads this once per process, at the first bind: set from the start,
            # every bind logs its memory plan (to /dev/null, or to the capture's file).
            child_env[env.MEM_PLAN_VERBOSE] = "1"
        # The library the user's process loaded, for the C API path (NOTE [ binding without
        # the mxnet package ] in capi.py); the child imports the package only if it must.
        mxnet_module = sys.modules.get("mxnet")
        library = getattr(getattr(getattr(mxnet_module, "base", None), "_LIB", None), "_name", None)
        return subprocess.Popen(
            [sys.executable, "-m", "mxnet_mirror_hook.mx.worker"] + ([library] if library else []),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=child_env, text=True, bufsize=1)

    def _stop(self, kill: bool = False) -> None:
        process, self._process = self._process, None
        self._answered = False
        if process is None:
            return
        try:
            if kill:
                process.kill()
            elif process.stdin is not None:
                process.stdin.close()
            process.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            process.kill()
            process.wait()

    def warm(self) -> None:
        """Start the child now (its MXNet import overlaps other work)."""
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._process = self._start()

    def measure(self, request: Mapping[str, Any]) -> float:
        """Send one request and return the planned MB.

        Raises
        ------
        MeasurementError
            If MXNet refused the bind or the worker died.
        """
        return float(self.exchange(request)["mb"])

    def exchange(self, request: Mapping[str, Any]) -> Dict[str, Any]:
        """Send one request and return the child's whole reply (``mb``, ``rss``, ``executed``...).

        Raises
        ------
        MeasurementError
            If MXNet refused the bind or the worker died.
        """
        with self._lock:
            self._sequence += 1
            line = json.dumps(dict(request, id=self._sequence)) + "\n"
            if self._process is None or self._process.poll() is not None:
                self._process = self._start()
                self._answered = False
            stdin, stdout = self._process.stdin, self._process.stdout
            assert stdin is not None and stdout is not None  # the child is started with pipes
            try:
                try:
                    stdin.write(line)
                    stdin.flush()
                    answer = stdout.readline()
                except (BrokenPipeError, OSError):
                    answer = ""
            except BaseException:
                # Interrupted between request and reply (KeyboardInterrupt...): the
                # child may still answer, and that answer must never be taken for
                # the next request's.  Drop the child.
                self._stop(kill=True)
                raise
            if not answer:
                code = self._process.poll()
                self._stop(kill=True)
                raise MeasurementError(
                    f"the measuring process died while binding (exit code {code}); MXNet may have "
                    f"crashed on this symbol. Set MXNET_MIRROR_HOOK_MEASURE=inprocess to see its error")
            reply = json.loads(answer)
            if reply.get("id") != self._sequence:
                self._stop(kill=True)
                raise MeasurementError("the measuring process answered out of turn; it was restarted")
            self._answered = True
            self.cpu_seconds += reply.get("cpu", self._process_cpu) - self._process_cpu
            self._process_cpu = reply.get("cpu", self._process_cpu)
            self.answered += 0 if request.get("ping") else 1
            if not reply.get("ok"):
                raise MeasurementError(reply.get("error", "unknown error in the measuring process"))
            self.last_resident_mb = reply["rss"] / MB
            if self.last_resident_mb > self.max_resident_mb:
                logger.debug("measuring process at %.0f MB; restarting it", self.last_resident_mb)
                self._stop()
                self.restarts += 1
                # The replacement starts with the next request, not now: on two
                # cores its MXNet import would slow the planner's own search.
            return reply

    def close(self) -> None:
        """Stop the child process."""
        with self._lock:
            self._stop()


#: A first ``measure_many`` with at most this many requests is served by the ready workers
#: alone (NOTE [ only ready workers measure ]).
FEW_REQUESTS = 4


class WorkerPool:
    """A few :class:`MeasureWorker` processes measuring independent candidates in parallel.

    # NOTE [ only ready workers measure ]
    # Starting a worker costs its MXNet import (1.5-4 s here, on a busy two-core
    # machine more), which a plan should not wait for when another process can
    # already bind.  ``measure_many`` hands requests only to workers that have
    # answered before (the capture worker included, which has always answered
    # by the time candidates are bound) and starts the others in the
    # background, for later plans; only when none is ready does it start one
    # and wait.  Every worker gives the same figure for a symbol, so which one
    # measures does not change a plan.  The first call, when it brings only the
    # few binds that confirm a modelled plan (:data:`FEW_REQUESTS`), starts no
    # other worker: on two cores their imports (~1.5 s of CPU each) would slow
    # that first plan, which the capture worker serves alone in a second or
    # less; a process that goes on planning starts them with its next call.

    Parameters
    ----------
    size : int, optional
        Number of measuring processes (default ``$MXNET_MIRROR_HOOK_WORKERS`` or
        ``min(2, cpu_count)``); each bind is single-threaded graph work.
    """

    def __init__(self, size: Optional[int] = None) -> None:
        size = env.worker_count() if size is None else max(1, size)
        self.workers = [MeasureWorker() for _ in range(size)]
        self.calls = 0
        #: Other workers that may measure when they are ready (the capture worker).
        self.helpers: List[MeasureWorker] = []

    def measure_many(self, requests: List[Mapping[str, Any]]) -> List[float]:
        """Measure every request; results in request order.

        Raises
        ------
        MeasurementError
            The first error (in request order) any request met; the others
            still finish.
        """
        self.calls += 1
        ready = [w for w in self.workers + self.helpers if w.ready]
        starting = [w for w in self.workers if not w.ready]
        if ready and self.calls == 1 and len(requests) <= FEW_REQUESTS:
            starting = []  # NOTE [ only ready workers measure ]: the first plan's few binds
        for worker in starting:
            worker.warm_in_background()
        if not ready:
            ready = [starting.pop(0)]  # nothing has started: wait for one
        if len(requests) == 1 or (len(ready) == 1 and not starting):
            return [ready[0].measure(request) for request in requests]
        results: List[Optional[float]] = [None] * len(requests)
        errors: Dict[int, BaseException] = {}
        cursor = [0]
        lock = threading.Lock()

        def take() -> Optional[int]:
            with lock:
                if cursor[0] >= len(requests):
                    return None
                cursor[0] += 1
                return cursor[0] - 1

        def drain(worker: MeasureWorker, wait: bool) -> None:
            # A starting worker joins once it is ready, if requests are left by then.
            while wait and not worker.ready and cursor[0] < len(requests):
                time.sleep(0.02)
            while True:
                index = take()
                if index is None:
                    return
                try:
                    results[index] = worker.measure(requests[index])
                except MeasurementError as error:
                    errors[index] = error

        jobs = [(w, False) for w in ready] + [(w, True) for w in starting]
        with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="mirror-measure") as threads:
            list(threads.map(lambda job: drain(*job), jobs))
        if errors:
            raise errors[min(errors)]
        return [float(r) for r in results]  # type: ignore[arg-type]

    def warm(self) -> None:
        """Start every worker process now."""
        for worker in self.workers:
            worker.warm()

    def close(self) -> None:
        """Stop every worker process."""
        for worker in self.workers:
            worker.close()


_POOL: Optional[WorkerPool] = None
_POOL_LOCK = threading.Lock()


def get_pool() -> WorkerPool:
    """The process-wide pool (its processes start lazily); the capture worker helps it."""
    global _POOL
    capture = get_capture_worker()
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = WorkerPool()
            _POOL.helpers.append(capture)
        return _POOL


_CAPTURES: Dict[Tuple[Tuple[Tuple[str, str], ...], int], MeasureWorker] = {}

#: Capture workers per environment that independent captures may run on at once
#: (NOTE [ segments captured two at a time ] in mx/segments/measure.py).
CAPTURE_SLOTS = 2


def get_capture_worker(environment: Optional[Mapping[str, str]] = None, slot: int = 0) -> MeasureWorker:
    """The process-wide worker that captures executed graphs (memory-plan log on), one per
    extra ``environment`` (segment binds run under the gradient-sum cap, which MXNet reads
    once per process: NOTE [ the gradient-sum cap is read once per process ] in
    mx/segments/environment.py) and ``slot`` (``0 <= slot < CAPTURE_SLOTS``: another process
    under the same environment, for captures made in parallel; every slot gives the same
    figures)."""
    if not 0 <= slot < CAPTURE_SLOTS:
        raise ValueError(f"capture slot {slot} outside 0..{CAPTURE_SLOTS - 1}")
    key = (tuple(sorted((environment or {}).items())), slot)
    with _POOL_LOCK:
        if key not in _CAPTURES:
            _CAPTURES[key] = MeasureWorker(verbose=True, environment=dict(key[0]))
        return _CAPTURES[key]


def worker_stats() -> Dict[str, Dict[str, float]]:
    """What the process-wide workers did so far, by role (``pool 0``, ``capture {env} 1``...):
    processes started, requests answered and the CPU seconds their processes reported."""
    with _POOL_LOCK:
        named = [(f"pool {i}", w) for i, w in enumerate(_POOL.workers if _POOL is not None else [])]
        named += [(f"capture {dict(env_items)} {slot}", w) for (env_items, slot), w in _CAPTURES.items()]
    return {name: {"started": w.started, "answered": w.answered, "cpu_seconds": round(w.cpu_seconds, 3)}
            for name, w in named}


def shutdown_workers() -> None:
    """Stop the process-wide workers (they restart on the next measurement)."""
    with _POOL_LOCK:
        if _POOL is not None:
            _POOL.close()
        for worker in _CAPTURES.values():
            worker.close()


atexit.register(shutdown_workers)


def _answer_with_package(request: Mapping[str, Any]) -> Dict[str, Any]:
    """One request through :mod:`.bind` with the ``mxnet`` package imported (the path every
    request took before NOTE [ binding without the mxnet package ]; now the fallback)."""
    import mxnet as mx
    import numpy as np

    from .bind import planned_mb_in_process
    from .executed import capture_executed_graph
    from .text import UnreadableGraphError

    symbol = mx.sym.load_json(request["symbol"])
    kind, index = request["ctx"]
    types = {k: np.dtype(v) for k, v in request.get("types", {}).items()}
    shapes = {k: tuple(v) for k, v in request["shapes"].items()}
    ctx = mx.Context(kind, index)
    if request.get("capture"):
        try:
            executed = capture_executed_graph(symbol, ctx, shapes, types, request["grad_req"])
        except UnreadableGraphError as error:
            return _unreadable_reply(error)
        return {"ok": True, "executed": executed.to_dict(), "mb": executed.measured_mb}
    return {"ok": True, "mb": planned_mb_in_process(symbol, ctx, shapes, types, request["grad_req"])}


def _answer_with_library(binder: Any, request: Mapping[str, Any]) -> Dict[str, Any]:
    """One request through MXNet's C API (raises ``CApiUnsupported`` to fall back)."""
    import tempfile

    from .capi import CApiUnsupported
    from .process import stderr_into
    from .text import UnreadableGraphError, capture_match_range, executed_graph_from_text, parse_planned_mb

    if "device" not in request:
        raise CApiUnsupported("the request has no device id")
    shapes = {k: tuple(v) for k, v in request["shapes"].items()}
    args = (request["symbol"], tuple(request["device"]), shapes, request.get("type_ids") or None,
            request["grad_req"])
    with env.scoped(env.quiet_bind()):
        if not request.get("capture"):
            debug, _ = binder.debug_str(*args)
            return {"ok": True, "mb": parse_planned_mb(debug)}
        match_range = capture_match_range()
        with tempfile.TemporaryFile(mode="w+b") as log_file:
            with stderr_into(log_file), env.scoped({env.MEM_PLAN_VERBOSE: "1"}):
                debug, num_heads = binder.debug_str(*args)  # logs its plan
            log_file.seek(0)
            log_text = log_file.read().decode("utf-8", "replace")
    try:
        graph = executed_graph_from_text(debug, log_text, num_heads, match_range)
    except UnreadableGraphError as error:
        return _unreadable_reply(error)
    return {"ok": True, "executed": graph.to_dict(), "mb": graph.measured_mb}


def _unreadable_reply(error: Any) -> Dict[str, Any]:
    """The reply to a capture whose graph cannot be read: MXNet's figure without the graph
    (NOTE [ a figure without its graph ] in text.py)."""
    return {"ok": True, "executed": None, "mb": error.planned_mb, "unreadable": str(error)}


def _serve(library: Optional[str] = None) -> int:
    """Child side: answer requests until stdin closes (C API first, the package if needed)."""
    from .process import resident_bytes
    from .capi import CApiBinder, CApiUnsupported

    binder = None
    if library:
        try:
            binder = CApiBinder(library)
        except (CApiUnsupported, OSError):
            binder = None
    for line in sys.stdin:
        try:
            request = json.loads(line)
            if request.get("ping"):
                reply: Dict[str, Any] = {"ok": True, "mb": 0.0}
            else:
                # A segment bound under its own match range (NOTE [ a match range per
                # segment ] in core/segments/pool.py): nnvm reads the variable at every bind.
                scope = ({env.MATCH_RANGE: str(int(request["match_range"]))}
                         if request.get("match_range") else {})
                with env.scoped(scope):
                    try:
                        if binder is None:
                            raise CApiUnsupported("no library")
                        reply = _answer_with_library(binder, request)
                        reply["via"] = "capi"
                    except CApiUnsupported:
                        reply = _answer_with_package(request)
                        reply["via"] = "package"
            reply["rss"] = resident_bytes()
            reply["cpu"] = time.process_time()  # this process's CPU seconds so far
        except MeasurementError as error:
            reply = {"ok": False, "error": str(error)}
        except Exception as error:  # report anything else rather than dying silently
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
        try:
            reply["id"] = json.loads(line).get("id")
        except ValueError:
            reply["id"] = None
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1] if len(sys.argv) > 1 else None))
