"""Command line: ``mxnet-mirror plan SYMBOL.json --shape data=32,3,224,224``."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, List, Optional, Sequence, Tuple

__all__ = ["main", "build_parser", "parse_shape", "parse_batch_shape", "SUBCOMMANDS"]

#: Subcommands of ``mxnet-mirror``; ``python -m mxnet_mirror_hook`` runs a script otherwise.
SUBCOMMANDS = ("plan", "report", "pareto", "max-batch")

logger = logging.getLogger(__name__)


def parse_shape(text: str) -> Tuple[str, Tuple[int, ...]]:
    """``'data=32,3,224,224'`` -> ``('data', (32, 3, 224, 224))``."""
    name, sep, dims = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--shape wants NAME=D1,D2,..., got {text!r}")
    try:
        shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: dimensions must be integers") from None
    if not shape or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"--shape {text!r}: dimensions must be positive")
    return name.strip(), shape


def parse_batch_shape(text: str) -> Tuple[str, Tuple[Optional[int], ...]]:
    """``'data=B,3,224,224'`` -> ``('data', (None, 3, 224, 224))``: ``B`` marks the batch axis."""
    name, sep, dims = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--shape wants NAME=B,D2,... (B: the batch), got {text!r}")
    shape: List[Optional[int]] = []
    for part in (d.strip() for d in dims.split(",") if d.strip()):
        if part.upper() == "B":
            shape.append(None)
        elif part.isdigit() and int(part) > 0:
            shape.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"--shape {text!r}: dimensions are positive integers or B")
    if None not in shape:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: mark the batch axis with B, "
                                         f"e.g. data=B,3,224,224")
    return name.strip(), tuple(shape)


def _add_max_batch(commands: Any, planning: argparse.ArgumentParser) -> None:
    """The ``max-batch`` subcommand's parser."""
    found = commands.add_parser("max-batch", parents=[planning],
                                help="the largest batch whose whole footprint fits --device-memory: "
                                     "plain, one-level and segments")
    found.add_argument("symbol", help="SYMBOL.json saved by mx.sym.Symbol.save or Module.save_checkpoint")
    found.add_argument("--shape", action="append", type=parse_batch_shape, required=True,
                       metavar="NAME=B,D2,...", help="shape of a data or label input, B the batch (repeat)")
    found.add_argument("--optimizer", default="sgd", help="optimizer whose state is counted (default sgd)")
    found.add_argument("--momentum", type=float, default=0.9,
                       help="momentum of sgd/nag-like optimizers (default 0.9; 0: no state)")
    found.add_argument("--device", choices=("cpu", "gpu"), default=None,
                       help="the device whose memory is counted (default: where plans are measured, "
                            "the CPU unless --cost-ctx gpu); gpu for a graphics card")
    found.add_argument("--method", choices=("search", "slope"), default="search",
                       help="search: plans at real batches; slope: two probes, extrapolated")
    found.add_argument("--json", action="store_true",
                       help="print one JSON object: per plain, one-level and segments the batch and "
                            "its footprint")


def build_parser() -> argparse.ArgumentParser:
    """The ``mxnet-mirror`` argument parser."""
    from ..options import option_arguments, option_parser

    parser = argparse.ArgumentParser(
        prog="mxnet-mirror", description="Plan MXNet memory mirroring (recompute forward nodes "
        "during backward) for a saved symbol.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log planning progress")
    commands = parser.add_subparsers(dest="command", required=True)
    shape = argparse.ArgumentParser(add_help=False)
    shape.add_argument("symbol", help="SYMBOL.json saved by mx.sym.Symbol.save or Module.save_checkpoint")
    shape.add_argument("--shape", action="append", type=parse_shape, required=True,
                       metavar="NAME=D1,D2,...", help="shape of a data or label input (repeat)")
    planning = option_parser(switch=False)
    plan = commands.add_parser("plan", parents=[shape, planning],
                               help="plan a symbol and report memory before and after")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.add_argument("-o", "--output", default=None,
                      help="also save the mirrored symbol to this JSON file")
    report = commands.add_parser("report", parents=[shape, planning],
                                 help="draw live memory along one iteration (PNG)")
    report.add_argument("-o", "--output", default="mirror-report.png", help="PNG to write")
    report.add_argument("--measured", action="store_true",
                        help="draw measured memory instead of the liveness model: one training iteration "
                        "(SGD, momentum 0.9) plain and one with the plan on the CPU, each in a fresh process "
                        "under MXNet's storage profiler, over the predicted footprint's parts")
    measuring = argparse.ArgumentParser(add_help=False)
    option_arguments(measuring, switch=False, only=("cost_ctx", "keep_ops"))
    pareto = commands.add_parser(
        "pareto", parents=[shape, measuring],
        help="memory against recomputation for our plans, the seed's and "
        "MXNET_BACKWARD_DO_MIRROR=1 (CSV and PNG)")
    pareto.add_argument("--measure", action="store_true",
                        help="also time training iterations on the CPU (our front, the seed's best, "
                        "MXNET_BACKWARD_DO_MIRROR=1) against the plain symbol")
    pareto.add_argument("--repeats", type=int, default=3, help="timed iterations per plan")
    pareto.add_argument("--limits", default="0.02,0.05,0.1,0.2", type=_limits,
                        help="also plan with max_overhead at each of these limits (comma-separated "
                        "fractions; '' for none): what a user asking for the least memory within that "
                        "much more time gets, fused operators included")
    option_arguments(pareto, switch=False, title=None, only=("recompute_dropout",))
    pareto.add_argument("--csv", default="pareto.csv", help="CSV to write")
    pareto.add_argument("--png", default="pareto.png", help="PNG to write")
    _add_max_batch(commands, planning)
    return parser


def _limits(text: str) -> Tuple[float, ...]:
    """``--limits``: comma-separated overhead fractions, each in (0, 10]."""
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--limits takes fractions such as 0.02,0.05, got {text!r}") from None
    if any(not 0 < value <= 10 for value in values):
        raise argparse.ArgumentTypeError(f"--limits are fractions of an iteration in (0, 10], got {text!r}")
    return values


def _load_symbol(path: str) -> Any:
    """The symbol saved at ``path``, or None after logging why it cannot be loaded."""
    import mxnet as mx

    try:
        return mx.sym.load(path)
    except (OSError, mx.base.MXNetError) as error:
        logger.error("cannot load symbol %s: %s", path, str(error).splitlines()[0])
        return None


def _load_and_plan(args: argparse.Namespace):
    """Load the symbol and plan it; ``(symbol, plan)``, or ``None`` after logging why."""

    from ..errors import MirrorHookError
    from ..options import MirrorOptions
    from ..plan import plan_mirror

    symbol = _load_symbol(args.symbol)
    if symbol is None:
        return None
    try:
        options = MirrorOptions.from_args(args)
        plan = plan_mirror(symbol, list(args.shape), options=options)
    except (MirrorHookError, ValueError, TypeError) as error:
        _error_line(error)
        return None
    return symbol, plan


def _error_line(error: BaseException) -> None:
    """Report a planning error as one line on stderr (logged, so ``-v`` runs keep it in order)."""
    logger.error("%s", " ".join(str(error).split()))


def run_report(args: argparse.Namespace) -> int:
    """The ``report`` command."""
    import os

    from ..mx.convert import normalize_inputs, symbol_to_graph
    from .report import draw_report

    loaded = _load_and_plan(args)
    if loaded is None:
        return 2
    symbol, plan = loaded
    if args.measured:
        return _run_measured_report(args, symbol, plan)
    graph = symbol_to_graph(symbol, normalize_inputs(list(args.shape)))
    draw_report(graph, plan, os.path.basename(args.symbol), args.output)
    sys.stdout.write(f"{args.output}: {plan.summary()}\n")
    return 0


def _run_measured_report(args: argparse.Namespace, symbol: Any, plan: Any) -> int:
    """``report --measured``: profile plain and planned training, draw both, print the peaks."""
    import os
    import re

    from ..errors import MirrorHookError
    from ..options import MirrorOptions
    from .memory_picture import write_measured_report

    try:
        title = re.sub(r"(-symbol)?\.json$", "", os.path.basename(args.symbol))
        found = write_measured_report(symbol, list(args.shape), plan, MirrorOptions.from_args(args), title,
                                      args.output)
    except (MirrorHookError, ValueError, TypeError) as error:
        _error_line(error)
        return 2
    sys.stdout.write(f"{args.output}: measured peak {found.plain.peak_mb:.0f} MB plain, "
                     f"{found.mirrored.peak_mb:.0f} MB mirrored ({found.ratio:.2f}x); predicted footprint "
                     f"{found.plain_footprint.total:.0f} -> {found.mirrored_footprint.total:.0f} MB; "
                     f"{plan.summary()}\n")
    return 0


def run_pareto(args: argparse.Namespace) -> int:
    """The ``pareto`` command."""
    import os


    from ..errors import MirrorHookError
    from .pareto import draw_pareto, pareto_points, write_csv

    if args.repeats < 1:
        logger.error("--repeats must be at least 1, got %d", args.repeats)
        return 2
    symbol = _load_symbol(args.symbol)
    if symbol is None:
        return 2
    try:
        points = pareto_points(symbol, list(args.shape), measure_time=args.measure,
                               repeats=args.repeats, ctx=args.cost_ctx, keep_ops=args.keep_ops,
                               limits=args.limits, recompute_dropout=bool(args.recompute_dropout))
    except (MirrorHookError, ValueError, TypeError) as error:
        _error_line(error)
        return 2
    write_csv(points, args.csv)
    draw_pareto(points, os.path.basename(args.symbol), args.png)
    lines = [f"{'source':<28} {'MB':>8} {'x base':>7} {'est.':>7} {'meas.':>7}  label"]
    for point in points:
        measured = "" if point.measured_overhead is None else f"{point.measured_overhead:.1%}"
        mark = "*" if point.on_front else " "
        lines.append(f"{point.source:<28} {point.planned_mb:>8.1f} {point.ratio:>7.2f} "
                     f"{point.estimated_overhead:>7.1%} {measured:>7} {mark}{point.label}")
    lines.append(f"(* = on our Pareto front)  wrote {args.csv} and {args.png}")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    """The ``plan`` command."""
    loaded = _load_and_plan(args)
    if loaded is None:
        return 2
    _, plan = loaded
    if args.output:
        plan.symbol.save(args.output)
    if args.json:
        document = plan.to_dict()
        sys.stdout.write(json.dumps(document, indent=1) + "\n")
    else:
        lines = [
            f"symbol         {args.symbol}",
            f"planner        {plan.planner} (budget {plan.budget}, measured on {plan.context})",
            f"baseline       {plan.baseline_mb:.0f} MB",
            f"planned        {plan.planned_mb:.0f} MB  ({plan.ratio:.2f} x baseline)",
            f"est. overhead  {plan.overhead:.1%} of a training iteration",
            f"recomputed     {len(plan.mirrored)} nodes, kept {plan.kept_count}",
            f"planning time  {plan.planning_seconds:.2f} s{' (from cache)' if plan.from_cache else ''}",
        ]
        if args.output:
            lines.append(f"saved          {args.output}")
        sys.stdout.write("\n".join(lines) + "\n")
    return 0


def run_max_batch(args: argparse.Namespace) -> int:
    """The ``max-batch`` command."""

    from ..errors import MirrorHookError
    from ..options import MirrorOptions
    from ..planning.batch import max_batch

    if args.device_memory is None:
        logger.error("max-batch needs --device-memory, e.g. --device-memory 16GB")
        return 2
    symbol = _load_symbol(args.symbol)
    if symbol is None:
        return 2
    params = {"momentum": args.momentum} if args.optimizer.lower() in _MOMENTUM_OPTIMIZERS else {}
    try:
        options = MirrorOptions.from_args(args).replace(device_memory=None)
        found = max_batch(symbol, dict(args.shape), args.device_memory, optimizer=args.optimizer,
                          optimizer_params=params, device=args.device, method=args.method, options=options)
    except (MirrorHookError, ValueError, TypeError) as error:
        _error_line(error)
        return 2
    if args.json:
        sys.stdout.write(json.dumps(found.to_dict()) + "\n")
    else:
        sys.stdout.write(found.summary() + "\n")
    return 0


#: Optimizers with a ``momentum`` option (``--momentum`` applies to them).
_MOMENTUM_OPTIMIZERS = ("sgd", "nag", "lars", "lbsgd", "signum", "dcasgd", "ccsgd")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``mxnet-mirror``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command == "plan":
        return run_plan(args)
    if args.command == "report":
        return run_report(args)
    if args.command == "pareto":
        return run_pareto(args)
    if args.command == "max-batch":
        return run_max_batch(args)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
