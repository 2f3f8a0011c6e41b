"""``MirrorOptions``: the one options object every surface takes.

The same choices (which planner, what memory budget, where the plan cache
lives, where plans are measured, which operator types are never recomputed,
which execution backend and how many segments) reach
:func:`~mxnet_mirror_hook.plan_mirror` from ``MirroredModule``,
``MirroredBucketingModule``, the Gluon surfaces, the script runner and the
command line.  They are validated once, here, when the object is made, so a bad
planner name or budget fails where the user wrote it, not at the first bind.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import textwrap
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Tuple, TypeVar, Union

from .core.budget import Budget, BudgetLike, parse_budget
from .core.planners import get_planner, list_planners
from .errors import BudgetError, OptionError

__all__ = ["MirrorOptions", "OPTION_NAMES", "OPTION_DOCS", "BACKENDS", "takes_options", "options_doc",
           "normalize_keep_ops", "option_arguments", "option_parser"]

#: One line per option: (name, numpydoc type, description).  The one source of every surface's
#: option keywords and of their documentation (see :func:`takes_options`).
OPTION_DOCS: Tuple[Tuple[str, str, str], ...] = (
    ("planner", "str",
     "A registered planner name (``'auto'`` by default; see :func:`~mxnet_mirror_hook.list_planners`)."),
    ("memory_budget", "None, 'min', float, int or str",
     "The activation memory to plan for: ``None`` (the lowest memory within about one extra "
     "forward pass), ``'min'``, a fraction of the unmirrored plan (``0.6``, ``'60%'``) or a size "
     "(``'4GB'``, bytes); see :func:`~mxnet_mirror_hook.parse_budget`."),
    ("cache_dir", "str, None or False",
     "Plan cache directory (``None``: ``$MXNET_MIRROR_HOOK_CACHE_DIR`` or "
     "``~/.cache/mxnet_mirror_hook``; ``False``: memory only)."),
    ("cost_ctx", "mx.Context or str, optional",
     "Where plans are measured (CPU by default: a CPU bind plans the same graph without "
     "allocating it).  The old keyword ``ctx`` still works, with a deprecation warning."),
    ("keep_ops", "iterable of str",
     "Operator types never to recompute (their outputs are kept); stored sorted and without "
     "duplicates."),
    ("backend", "str",
     "``'auto'`` (the default: executor segments when their whole footprint on the device, "
     "MKLDNN's copies at the cuts included, is clearly below the one-level plan's, else the "
     "one-level plan), ``'mirror'`` (MXNet's one-level mirror: training bit for bit as plain "
     "MXNet; ask for it for bit-identical training) or ``'segments'`` (executor segments, always).  "
     "See the guarantees in the docs."),
    ("segments", "int, optional", "Number of executor segments (default: chosen by the planner)."),
    ("recompute_dropout", "bool",
     "Let Dropout be recomputed: the one-level mirror rewrites each ``Dropout`` into a stored "
     "1-byte mask and a product it may recompute; executor segments replay each re-run "
     "segment's random draws.  Off by default: either way the masks come from another random "
     "stream than MXNet's Dropout would use."),
    ("max_overhead", "float, optional",
     "The extra time allowed, as a fraction of one training iteration (``0.05``: 5%): plans a "
     "selective segment chain, segments keeping their activations or re-run as a dynamic program "
     "chooses (the least memory within it; with a ``memory_budget`` limit, the least recomputation "
     "that fits, refused when none fits within it).  Under ``'auto'`` the least-memory one-level "
     "plan within the limit is planned too and the lower is taken (only it when the network draws "
     "random numbers without ``recompute_dropout``); ``'segments'`` plans the selective chain "
     "alone and ``'mirror'`` plans under ``memory_budget`` alone."),
    ("device_memory", "str or int, optional",
     "The device's memory for the whole training footprint (``'16GB'``, bytes): parameters, "
     "gradients, optimizer state, auxiliary states, inputs, workspace and activations "
     "(``MirrorPlan.footprint``).  Plans the least recomputation whose footprint fits (the device "
     "memory minus everything but the activations becomes the activation budget); one "
     "``DeviceMemoryError`` line with the smallest footprint reachable and the largest batch that "
     "would fit when none does.  ``memory_budget`` counts activations only; give one of the two."),
)

#: The option names, as keyword arguments of every surface (in :data:`OPTION_DOCS` order).
OPTION_NAMES: Tuple[str, ...] = tuple(name for name, _, _ in OPTION_DOCS)
#: Execution backends: MXNet's one-level mirror, executor segments, or the lower of the two.
BACKENDS = ("mirror", "segments", "auto")
#: Old keyword spellings still accepted (with a DeprecationWarning) -> the option they mean.
DEPRECATED_KEYWORDS = {"ctx": "cost_ctx"}
#: The line of a docstring that :func:`takes_options` replaces by the options' entries.
OPTIONS_MARKER = "<mirror options>"


def options_doc(indent: str = "    ") -> str:
    """The numpydoc ``Parameters`` entries of every option, indented by ``indent``."""
    lines = []
    for name, kind, text in OPTION_DOCS:
        lines.append(f"{indent}{name} : {kind}")
        lines.extend(indent + "    " + line for line in textwrap.wrap(text, 96 - len(indent)))
    return "\n".join(lines)


def _document_options(doc: Optional[str]) -> str:
    """``doc`` with its :data:`OPTIONS_MARKER` line replaced by :func:`options_doc`."""
    if not doc or OPTIONS_MARKER not in doc:
        raise TypeError(f"a surface taking mirror options must have a {OPTIONS_MARKER!r} line in the "
                        f"Parameters section of its docstring")
    match = re.search(r"^([ \t]*)" + re.escape(OPTIONS_MARKER) + r"[ \t]*$", doc, re.MULTILINE)
    if match is None:
        raise TypeError(f"the {OPTIONS_MARKER!r} line must stand alone in the docstring")
    return doc[:match.start()] + options_doc(match.group(1)) + doc[match.end():]


F = TypeVar("F", bound=Callable[..., Any])


def takes_options(func: F) -> F:
    """Declare a surface (a function or a class) that takes ``options=`` plus keyword overrides.

    The function (or the class's ``__init__``) is written with ``options=None, **overrides`` (read them with
    :meth:`MirrorOptions.coerce`); this gives it a signature listing every
    field of :class:`MirrorOptions` as a keyword-only argument (what
    ``help()``, IDEs and the API docs show) and replaces the
    :data:`OPTIONS_MARKER` line of its (the class's) docstring by their descriptions.  A new
    option is then added once, in :data:`OPTION_DOCS` and the dataclass.

    # NOTE [ one signature source for the options ]
    # Five surfaces (plan_mirror, MirroredModule, MirroredBucketingModule, mirror,
    # MirroredTrainer) used to repeat the keywords and their docs, and drifted (one
    # took ``ctx``, the rest ``cost_ctx``; some docstrings listed 5 of 8 options).
    # Now they take ``**overrides`` validated by ``MirrorOptions.coerce`` (an
    # unknown keyword is a TypeError naming the options) and this decorator writes
    # the visible signature and docstring from one table.
    """
    target: Any = getattr(func, "__init__") if isinstance(func, type) else func
    signature = inspect.signature(target)
    if "options" not in signature.parameters:
        raise TypeError(f"{func.__qualname__} must take options= to be declared with takes_options")
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
               for name in OPTION_NAMES if name not in signature.parameters]
    target.__signature__ = signature.replace(parameters=params)
    func.__doc__ = _document_options(func.__doc__)
    return func


@dataclass(frozen=True)
class MirrorOptions:
    """What to plan and how; validated when made.

    Parameters
    ----------
    <mirror options>

    Raises
    ------
    TypeError, UnknownPlannerError, BudgetError, OptionError
        For a value of the wrong type, an unknown planner, a budget that
        makes no sense or another option out of range.
    """

    planner: str = "auto"
    memory_budget: BudgetLike = None
    cache_dir: Union[None, str, bool] = None
    cost_ctx: Any = None
    keep_ops: Tuple[str, ...] = ()
    backend: str = "auto"
    segments: Optional[int] = None
    recompute_dropout: bool = False
    max_overhead: Optional[float] = None
    device_memory: Union[None, str, int] = None

    def __post_init__(self) -> None:
        get_planner(self.planner)  # TypeError / UnknownPlannerError naming the known ones
        object.__setattr__(self, "_budget", parse_budget(self.memory_budget))
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, bool)) \
                and not hasattr(self.cache_dir, "__fspath__"):
            raise TypeError(f"cache_dir must be a directory path, None (the default directory) or "
                            f"False (memory only); got {self.cache_dir!r}")
        if self.cache_dir is True:
            raise TypeError("cache_dir=True is ambiguous: pass None for the default directory, a "
                            "path, or False for memory only")
        object.__setattr__(self, "keep_ops", normalize_keep_ops(self.keep_ops))
        if self.backend not in BACKENDS:
            raise OptionError(f"backend must be one of {', '.join(BACKENDS)}; got {self.backend!r}")
        if self.segments is not None and (isinstance(self.segments, bool)
                                          or not isinstance(self.segments, int) or self.segments < 1):
            raise OptionError(f"segments must be a positive number of executor segments or None "
                              f"(chosen by the planner); got {self.segments!r}")
        if not isinstance(self.recompute_dropout, bool):
            raise TypeError(f"recompute_dropout must be True or False; got {self.recompute_dropout!r}")
        self._check_max_overhead()
        self._check_device_memory()

    def _check_device_memory(self) -> None:
        """Validate :attr:`device_memory`: a size, and not with an activation ``memory_budget``
        (NOTE [ planning for the device's memory ] in planning/device.py)."""
        if self.device_memory is None:
            return
        try:
            parsed = parse_budget(self.device_memory)
        except (TypeError, BudgetError) as error:
            parsed, why = None, str(error)
        if parsed is None or parsed.kind != "bytes":
            raise OptionError(f"device_memory must be a size such as '16GB' or a number of bytes; got "
                              f"{self.device_memory!r}" + (f" ({why})" if parsed is None else ""))
        if self.budget.kind != "auto":
            raise OptionError(f"give device_memory (the whole footprint) or memory_budget (activations "
                              f"only), not both; got device_memory={self.device_memory!r} and "
                              f"memory_budget={self.memory_budget!r}")

    @property
    def device_memory_mb(self) -> Optional[float]:
        """:attr:`device_memory` in MB (None when not given)."""
        if self.device_memory is None:
            return None
        return parse_budget(self.device_memory).limit_mb(0.0)

    def _check_max_overhead(self) -> None:
        """Validate :attr:`max_overhead`; it plans executor segments (``'auto'``, ``'segments'``; the
        one-level ``'mirror'`` backend, which a bucketing module's other buckets may be given, plans
        under ``memory_budget`` alone)
        (NOTE [ selective segments ] in core/segments/selective.py)."""
        if self.max_overhead is None:
            return
        value = self.max_overhead
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 10:
            raise OptionError(f"max_overhead must be the extra time allowed as a fraction of one "
                              f"iteration (0.05 for 5%); got {value!r}")
        object.__setattr__(self, "max_overhead", float(value))

    @property
    def budget(self) -> Budget:
        """The parsed :attr:`memory_budget`."""
        return self._budget  # type: ignore[attr-defined]

    @classmethod
    def coerce(cls, options: Optional["MirrorOptions"] = None, **kwargs: Any) -> "MirrorOptions":
        """An options object from ``options`` and/or keyword arguments.

        Keyword arguments that are not ``None`` override the fields of
        ``options``; with neither, the defaults.

        Raises
        ------
        TypeError
            For an unknown keyword or an ``options`` that is not a
            :class:`MirrorOptions`.
        """
        for old, new in DEPRECATED_KEYWORDS.items():
            if old in kwargs:
                warnings.warn(f"the keyword {old}= is deprecated; use {new}=", DeprecationWarning,
                              stacklevel=3)
                value = kwargs.pop(old)
                if kwargs.get(new) is None:
                    kwargs[new] = value
        unknown = set(kwargs) - set(OPTION_NAMES)
        if unknown:
            raise TypeError(f"unknown mirror option(s) {sorted(unknown)}; the options are "
                            f"{', '.join(OPTION_NAMES)}")
        if options is None:
            return cls(**{k: v for k, v in kwargs.items() if v is not None})
        if not isinstance(options, MirrorOptions):
            raise TypeError(f"options must be a MirrorOptions, got {type(options).__name__}")
        changes = {k: v for k, v in kwargs.items() if v is not None}
        return dataclasses.replace(options, **changes) if changes else options

    def replace(self, **changes: Any) -> "MirrorOptions":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> Dict[str, Any]:
        """The fields by name (the keyword arguments of every surface)."""
        return {name: getattr(self, name) for name in OPTION_NAMES}

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "MirrorOptions":
        """Options from the arguments :func:`option_arguments` added.

        ``--no-cache`` wins over ``--cache-dir`` (memory only).  Namespaces made
        by older code under the old destinations (``mirror_planner``,
        ``mirror_cache_dir``, ``budget``, ``ctx``) are read too.

        Raises
        ------
        TypeError, UnknownPlannerError, BudgetError
            As the constructor.
        """
        def first(*names: str) -> Any:
            for name in names:
                value = getattr(args, name, None)
                if value is not None:
                    return value
            return None

        cache_dir = False if getattr(args, "no_cache", False) else first("cache_dir", "mirror_cache_dir")
        return cls.coerce(planner=first("planner", "mirror_planner"),
                          memory_budget=first("memory_budget", "budget"), cache_dir=cache_dir,
                          cost_ctx=first("cost_ctx", "ctx"), keep_ops=first("keep_ops"),
                          backend=first("backend"), segments=first("segments"),
                          recompute_dropout=True if getattr(args, "recompute_dropout", False) else None,
                          max_overhead=first("max_overhead"), device_memory=first("device_memory"))

MirrorOptions.__doc__ = _document_options(MirrorOptions.__doc__)


def normalize_keep_ops(keep_ops: Union[None, str, Iterable[str]]) -> Tuple[str, ...]:
    """``keep_ops`` as :class:`MirrorOptions` stores it: sorted, unique, stripped.

    A string is read as a comma-separated list (``'BatchNorm,Convolution'``).

    Raises
    ------
    TypeError
        For anything but operator type names.
    """
    if keep_ops is None:
        return ()
    names = [part for part in keep_ops.split(",") if part.strip()] if isinstance(keep_ops, str) \
        else list(keep_ops)
    if not all(isinstance(op, str) for op in names):
        raise TypeError(f"keep_ops must be operator type names such as ['BatchNorm']; got {keep_ops!r}")
    return tuple(sorted({op.strip() for op in names}))


# NOTE [ one flag vocabulary ]
# Every command line that takes mirroring options (``python -m mxnet_mirror_hook``,
# ``mxnet-mirror plan/report/pareto``, scripts using ``add_arguments``, the examples)
# gets them from ``option_arguments``, under the names of ``MirrorOptions``' fields:
# --memory-budget, --planner, --cache-dir/--no-cache, --cost-ctx, --keep-ops (and the
# --mirror/--no-mirror switch for scripts).  Spellings users already typed stay as
# aliases: --budget and --ctx (the old ``mxnet-mirror plan``), --mirror-planner and
# --mirror-cache-dir (the old ``add_arguments``).  A user's own parser may already
# own one of these strings (a training script with its own ``--ctx``): that string
# is left to the script and ours is added under its other spellings only, so
# ``add_arguments`` never makes a script's parser raise a conflict.

#: (destination, option strings, argparse keywords) of every mirroring option.
_OPTIONS = (
    ("memory_budget", ("--memory-budget", "--budget"),
     {"metavar": "BUDGET", "help": "memory budget: 'min', a fraction of the unmirrored plan "
                                   "(0.6 or 60%%), or a size (4GB)"}),
    ("planner", ("--planner", "--mirror-planner"),
     {"choices": None, "default": "auto", "metavar": "NAME",
      "help": "mirroring planner: %(choices)s (default auto)"}),
    ("cache_dir", ("--cache-dir", "--mirror-cache-dir"),
     {"metavar": "DIR", "help": "plan cache directory (default $MXNET_MIRROR_HOOK_CACHE_DIR, else "
                                "~/.cache/mxnet_mirror_hook)"}),
    ("no_cache", ("--no-cache",),
     {"action": "store_true", "help": "keep plans in memory only (no disk cache)"}),
    ("cost_ctx", ("--cost-ctx", "--ctx"),
     {"metavar": "CTX", "help": "where plans are measured: cpu (default) or gpu[:N]"}),
    ("keep_ops", ("--keep-ops",),
     {"metavar": "OP[,OP]", "help": "operator types never to recompute, e.g. BatchNorm,Convolution"}),
    ("backend", ("--backend",),
     {"choices": BACKENDS, "metavar": "BACKEND",
      "help": "auto (the default: executor segments when their whole footprint is clearly lower, "
              "else the one-level mirror), mirror (MXNet's one-level mirror, bit-identical "
              "training) or segments (executor segments, always)"}),
    ("segments", ("--segments",),
     {"type": int, "metavar": "K", "help": "number of executor segments (default: chosen)"}),
    ("recompute_dropout", ("--recompute-dropout",),
     {"action": "store_true", "help": "rewrite Dropout so its output can be recomputed (1-byte masks "
                                      "from another random stream than MXNet's Dropout; off by default)"}),
    ("max_overhead", ("--max-overhead",),
     {"type": float, "metavar": "FRACTION",
      "help": "extra time allowed per iteration (0.05: 5%%): a selective segment plan, the least "
              "memory within it"}),
    ("device_memory", ("--device-memory",),
     {"metavar": "SIZE",
      "help": "the device's memory for the whole footprint (16GB): the least recomputation whose "
              "parameters, gradients, optimizer state, inputs and activations fit"}),
)


def _taken(container: Any) -> set:
    """Option strings a parser (or an argument group of one) already has."""
    return set(getattr(container, "_option_string_actions", {}))


def option_arguments(container: Any, *, switch: bool = True, mirror_default: bool = False,
                     title: Optional[str] = "memory mirroring (mxnet-mirror-hook)",
                     only: Optional[Iterable[str]] = None) -> Any:
    """Add the mirroring options to an argparse parser or argument group.

    Parameters
    ----------
    container : argparse.ArgumentParser or argument group
        Where to add them.  On a parser, they go in an argument group named
        ``title`` (``None``: directly on the parser).
    switch : bool
        Also add ``--mirror`` / ``--no-mirror`` (destination ``mirror``).
    mirror_default : bool
        The value of ``mirror`` when neither switch is given.
    title : str or None
        Name of the argument group made on a parser.
    only : iterable of str, optional
        Add only these destinations (e.g. ``('cost_ctx', 'keep_ops')`` for a
        command that neither plans with a budget nor caches).

    Returns
    -------
    The ``container`` given, for chaining.

    Notes
    -----
    Destinations are the :class:`MirrorOptions` field names (``memory_budget``,
    ``planner``, ``cache_dir``, ``cost_ctx``, ``keep_ops``) plus ``no_cache``;
    read them with :meth:`MirrorOptions.from_args`.  Option strings the
    container already owns are skipped (see NOTE [ one flag vocabulary ]).
    """
    target = container
    if title and isinstance(container, argparse.ArgumentParser):
        target = container.add_argument_group(title)
    taken = _taken(container)

    def add(dest: str, strings: Tuple[str, ...], **kwargs: Any) -> None:
        free = [s for s in strings if s not in taken]
        if free:
            target.add_argument(*free, dest=dest, **kwargs)

    if switch:
        add("mirror", ("--mirror",), action="store_true", default=mirror_default,
            help="recompute forward nodes during backward to save memory"
                 + (" (the default)" if mirror_default else ""))
        add("mirror", ("--no-mirror",), action="store_false", default=mirror_default,
            help="train without mirroring" + ("" if mirror_default else " (the default)"))
    wanted = None if only is None else set(only)
    for dest, strings, keywords in _OPTIONS:
        if wanted is not None and dest not in wanted:
            continue
        keywords = dict(keywords)
        if dest == "planner":
            keywords["choices"] = list_planners()
        if keywords.get("action") != "store_true":
            keywords.setdefault("default", None)
        add(dest, strings, **keywords)
    return container


def option_parser(*, switch: bool = True, mirror_default: bool = False) -> argparse.ArgumentParser:
    """A parent parser holding the mirroring options, for ``ArgumentParser(parents=[...])``.

    See :func:`option_arguments` for the parameters.
    """
    parser = argparse.ArgumentParser(add_help=False)
    return option_arguments(parser, switch=switch, mirror_default=mirror_default)
