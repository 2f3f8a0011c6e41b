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
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, TextIO, Type

import mxnet as mx

from .bucketing import MirroredBucketingModule
from .errors import BudgetError, UnknownPlannerError
from .module import MirroredModule
from .options import MirrorOptions, option_arguments

__all__ = ["add_arguments", "from_args", "mirrored_modules", "run_script", "main"]

logger = logging.getLogger(__name__)

#: The logger every record of the package goes through.
PACKAGE_LOGGER = __name__.rpartition(".")[0]
FALLBACK_FORMAT = "%(levelname)s %(name)s: %(message)s"


def _subclass_with_defaults(base: Type[Any], options: Dict[str, Any]) -> type:
    """A subclass of ``base`` whose constructor fills in ``options`` unless given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for key, value in options.items():
            kwargs.setdefault(key, value)
        base.__init__(self, *args, **kwargs)

    return type(base.__name__, (base,), {"__init__": __init__, "__doc__": base.__doc__,
                                          "__module__": base.__module__})


@contextlib.contextmanager
def mirrored_modules(options: Optional[MirrorOptions] = None, **kwargs: Any) -> Iterator[MirrorOptions]:
    """Within the block, ``mx.mod.Module`` and ``mx.mod.BucketingModule`` are the mirrored ones.

    Parameters
    ----------
    options : MirrorOptions, optional
        The options every module the script creates gets (unless it passes its own).
    **kwargs
        ``planner``, ``memory_budget``, ``cache_dir``, ``cost_ctx``, ``keep_ops``:
        override the fields of ``options`` (see :meth:`MirrorOptions.coerce`).

    Yields
    ------
    MirrorOptions
        The options in force.
    """
    chosen = MirrorOptions.coerce(options, **kwargs)
    defaults = {"options": chosen}  # a script's own keyword arguments override its fields
    package = mx.module
    saved = package.Module, package.BucketingModule
    package.Module = _subclass_with_defaults(MirroredModule, defaults)
    package.BucketingModule = _subclass_with_defaults(MirroredBucketingModule, defaults)
    try:
        yield chosen
    finally:
        package.Module, package.BucketingModule = saved


def run_script(script: str, script_args: Sequence[str], options: Optional[MirrorOptions] = None,
               **kwargs: Any) -> None:
    """Run ``script`` as ``__main__`` with mirrored modules (see :func:`mirrored_modules`)."""
    if not os.path.isfile(script):
        raise FileNotFoundError(f"no training script at {script!r}")
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [script] + list(script_args)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        with mirrored_modules(options, **kwargs):
            runpy.run_path(script, run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path


def add_arguments(parser: argparse.ArgumentParser, *, mirror_default: bool = False
                  ) -> argparse.ArgumentParser:
    """Add ``--mirror``/``--no-mirror`` and the mirroring options to a script's parser.

    The options are :func:`~mxnet_mirror_hook.options.option_arguments`'
    (``--memory-budget``, ``--planner``, ``--cache-dir``, ``--no-cache``,
    ``--cost-ctx``, ``--keep-ops``, with the old ``--mirror-planner`` and
    ``--mirror-cache-dir`` spellings); a string the parser already owns is left
    to it.  ``mirror_default`` is what ``args.mirror`` is without a switch.

    Returns ``parser``, for chaining.
    """
    return option_arguments(parser, switch=True, mirror_default=mirror_default)


def from_args(args: argparse.Namespace, bucketing: bool = False) -> Callable[..., Any]:
    """The module class to build, from the arguments :func:`add_arguments` added.

    Returns ``mx.mod.Module`` (or ``BucketingModule``) without ``--mirror``, else
    the mirrored class with the options bound; call it as you would ``Module``.

    Raises
    ------
    TypeError, UnknownPlannerError, BudgetError
        For options that make no sense (see :class:`MirrorOptions`).
    """
    if not getattr(args, "mirror", False):
        return mx.mod.BucketingModule if bucketing else mx.mod.Module
    options = MirrorOptions.from_args(args)
    base = MirroredBucketingModule if bucketing else MirroredModule
    return functools.partial(base, options=options)


def build_parser() -> argparse.ArgumentParser:
    """Parser of ``python -m mxnet_mirror_hook [options] script.py [args...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m mxnet_mirror_hook",
        description="Run an MXNet training script with mx.mod.Module and BucketingModule "
                    "replaced by mirrored ones (or use a subcommand: plan, report, pareto).")
    option_arguments(parser, switch=False, title=None)
    parser.add_argument("script", help="the training script to run (as __main__)")
    parser.add_argument("script_args", nargs=argparse.REMAINDER, help="its own arguments")
    return parser


# NOTE [ the runner and the script's logging ]
# The script owns logging: the runner never configures the root logger, so a
# script's own ``logging.basicConfig(format=..., level=...)`` takes effect (it
# only acts while root has no handler).  Our plan lines must still show when
# the script configures nothing, and must follow the script's handlers and
# level when it does.  While the script runs, the ``mxnet_mirror_hook`` logger
# holds one ``_ScriptLogBridge`` and does not propagate; for each record:
#   * the script configured logging (now or later): the record goes to root's
#     handlers if it passes root's level, exactly as propagation would have
#     done at the script's chosen level;
#   * it did not: INFO and above go to stderr in our own short format.
# "Configured" cannot mean "root has a handler": any module-level call such
# as ``logging.info(...)`` (MXNet's Module makes them, so do many scripts) runs
# an implicit ``basicConfig()`` when root has none, leaving root at WARNING
# with one stderr handler in ``logging.BASIC_FORMAT``.  That state counts as
# not configured (an explicit ``logging.basicConfig()`` without arguments looks
# the same and is treated the same: our INFO lines still show); a root level
# other than WARNING, or any other handler, counts as configured.
# Our logger's level is DEBUG meanwhile so that a script at DEBUG gets our
# DEBUG records; a level the script sets on our logger itself is respected
# (it is not overridden).  Everything is put back when the script ends.


class _ScriptLogBridge(logging.Handler):
    """Hands our records to the script's root handlers, or to stderr when it has none."""

    def __init__(self, stream: Optional[TextIO] = None) -> None:
        super().__init__(logging.DEBUG)
        self._fallback = logging.StreamHandler(stream)
        self._fallback.setFormatter(logging.Formatter(FALLBACK_FORMAT))

    def shows(self, levelno: int) -> bool:
        """Whether a record of this level reaches a stream."""
        root = logging.getLogger()
        return levelno >= (root.getEffectiveLevel() if _configured(root) else logging.INFO)

    def emit(self, record: logging.LogRecord) -> None:
        root = logging.getLogger()
        if not self.shows(record.levelno):
            return
        if _configured(root):
            root.handle(record)
        else:
            self._fallback.handle(record)


def _implicit_handler(handler: logging.Handler) -> bool:
    """Whether ``handler`` is the one an implicit ``logging.basicConfig()`` adds."""
    formatter = handler.formatter
    return (type(handler) is logging.StreamHandler and handler.level == logging.NOTSET
            and formatter is not None and getattr(formatter, "_fmt", None) == logging.BASIC_FORMAT)


def _configured(root: logging.Logger) -> bool:
    """Whether the script configured logging (see NOTE [ the runner and the script's logging ])."""
    if root.level != logging.WARNING:
        return True
    return any(not _implicit_handler(handler) for handler in root.handlers)


@contextlib.contextmanager
def script_logging(stream: Optional[TextIO] = None) -> Iterator[logging.Handler]:
    """While the block runs, route the package's records as NOTE [ the runner and the script's logging ]."""
    package = logging.getLogger(PACKAGE_LOGGER)
    saved = package.level, package.propagate
    bridge = _ScriptLogBridge(stream)
    if package.level == logging.NOTSET:
        package.setLevel(logging.DEBUG)
    package.propagate = False
    package.addHandler(bridge)
    try:
        yield bridge
    finally:
        package.removeHandler(bridge)
        package.setLevel(saved[0])
        package.propagate = saved[1]


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the script runner.

    Returns 0, or 2 (after one line on stderr) when the mirroring options
    cannot be met: a budget that makes no sense or that no plan reaches.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        options = MirrorOptions.from_args(args)
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    if not os.path.isfile(args.script):
        parser.error(f"no training script at {args.script!r}")
    try:
        with script_logging():
            run_script(args.script, args.script_args, options)
    except (BudgetError, UnknownPlannerError) as error:  # one line, no traceback
        sys.stderr.write(f"{parser.prog}: error: {error}\n")
        return 2
    return 0
