"""Switch mirroring on in an existing training script, without editing it, or with a flag.

``python -m mxnet_mirror_hook [--memory-budget B] [--planner P] script.py [args...]``
runs ``script.py`` with ``mx.mod.Module`` and ``mx.mod.BucketingModule`` replaced by
the mirrored ones.  Scripts that want their own ``--mirror`` flag use
:func:`add_arguments` and :func:`from_args`.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import runpy
import sys
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import mxnet as mx

from .bucketing import MirroredBucketingModule
from .core.budget import parse_budget
from .core.planners import get_planner, list_planners
from .module import MirroredModule

__all__ = ["add_arguments", "from_args", "mirrored_modules", "run_script", "main"]

logger = logging.getLogger(__name__)


def _subclass_with_defaults(base: type, options: Dict[str, Any]) -> type:
    """A subclass of ``base`` whose constructor fills in ``options`` unless given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for key, value in options.items():
            kwargs.setdefault(key, value)
        base.__init__(self, *args, **kwargs)

    return type(base.__name__, (base,), {"__init__": __init__, "__doc__": base.__doc__,
                                          "__module__": base.__module__})


@contextlib.contextmanager
def mirrored_modules(**options: Any) -> Iterator[None]:
    """Within the block, ``mx.mod.Module`` and ``mx.mod.BucketingModule`` are the mirrored ones.

    Parameters
    ----------
    **options
        ``planner``, ``memory_budget``, ``cache_dir``, ``cost_ctx``, ``keep_ops``,
        passed to every module the script creates.
    """
    get_planner(options.get("planner", "auto"))
    parse_budget(options.get("memory_budget"))
    package = mx.module
    saved = package.Module, package.BucketingModule
    package.Module = _subclass_with_defaults(MirroredModule, options)
    package.BucketingModule = _subclass_with_defaults(MirroredBucketingModule, options)
    try:
        yield
    finally:
        package.Module, package.BucketingModule = saved


def run_script(script: str, script_args: Sequence[str], **options: Any) -> None:
    """Run ``script`` as ``__main__`` with mirrored modules (see :func:`mirrored_modules`)."""
    if not os.path.isfile(script):
        raise FileNotFoundError(f"no training script at {script!r}")
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [script] + list(script_args)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        with mirrored_modules(**options):
            runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--mirror``, ``--memory-budget``, ``--mirror-planner`` and ``--mirror-cache-dir``.

    Returns the argument group's parser, for chaining.
    """
    group = parser.add_argument_group("memory mirroring (mxnet-mirror-hook)")
    group.add_argument("--mirror", action="store_true",
                       help="recompute forward nodes during backward to save memory")
    group.add_argument("--memory-budget", default=None,
                       help="'min', a fraction of the plain memory (0.6), or a size (4GB)")
    group.add_argument("--mirror-planner", default="auto", choices=list_planners())
    group.add_argument("--mirror-cache-dir", default=None, help="plan cache directory")
    return parser


def from_args(args: argparse.Namespace, bucketing: bool = False) -> Callable[..., Any]:
    """The module class to build, from the arguments :func:`add_arguments` added.

    Returns ``mx.mod.Module`` (or ``BucketingModule``) without ``--mirror``, else
    the mirrored class with the options bound; call it as you would ``Module``.
    """
    if not getattr(args, "mirror", False):
        return mx.mod.BucketingModule if bucketing else mx.mod.Module
    budget = getattr(args, "memory_budget", None)
    parse_budget(budget)
    base = MirroredBucketingModule if bucketing else MirroredModule
    return functools.partial(base, planner=getattr(args, "mirror_planner", "auto"),
                             memory_budget=budget, cache_dir=getattr(args, "mirror_cache_dir", None))


def build_parser() -> argparse.ArgumentParser:
    """Parser of ``python -m mxnet_mirror_hook [options] script.py [args...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m mxnet_mirror_hook",
        description="Run an MXNet training script with mx.mod.Module and BucketingModule "
                    "replaced by mirrored ones (or use a subcommand: plan).")
    parser.add_argument("--memory-budget", default=None)
    parser.add_argument("--planner", default="auto", choices=list_planners())
    parser.add_argument("--cache-dir", default=None,
                        help="plan cache directory (default $MXNET_MIRROR_HOOK_CACHE_DIR)")
    parser.add_argument("script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the script runner."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_script(args.script, args.script_args, planner=args.planner,
               memory_budget=args.memory_budget, cache_dir=args.cache_dir)
    return 0
