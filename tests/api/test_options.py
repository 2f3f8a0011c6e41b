"""One flag vocabulary: the runner, the CLI, add_arguments and the examples read the same options."""
from __future__ import annotations

import argparse
import os
import sys

import pytest

from mxnet_mirror_hook import MirrorOptions, add_arguments
from mxnet_mirror_hook.errors import BudgetError, UnknownPlannerError
from mxnet_mirror_hook.options import option_arguments, option_parser
from mxnet_mirror_hook.runner import build_parser as runner_parser
from mxnet_mirror_hook.tools.cli import build_parser as cli_parser

from tests.paths import ROOT

FULL = ["--memory-budget", "60%", "--planner", "dp", "--cache-dir", "/tmp/plans", "--cost-ctx", "cpu",
        "--keep-ops", "Convolution,BatchNorm"]
OLD = ["--budget", "60%", "--mirror-planner", "dp", "--mirror-cache-dir", "/tmp/plans", "--ctx", "cpu",
       "--keep-ops", "BatchNorm,Convolution"]
EXPECTED = MirrorOptions(planner="dp", memory_budget="60%", cache_dir="/tmp/plans", cost_ctx="cpu",
                         keep_ops=("BatchNorm", "Convolution"))


def test_new_and_old_spellings_give_the_same_options():
    parser = argparse.ArgumentParser(parents=[option_parser()])
    new = MirrorOptions.from_args(parser.parse_args(FULL))
    parser = argparse.ArgumentParser(parents=[option_parser()])
    old = MirrorOptions.from_args(parser.parse_args(OLD))
    assert new == old == EXPECTED
    assert new.budget == old.budget and new.budget.value == 0.6


def test_defaults_and_no_cache():
    parser = argparse.ArgumentParser(parents=[option_parser()])
    args = parser.parse_args([])
    assert args.mirror is False and MirrorOptions.from_args(args) == MirrorOptions()
    assert args.planner == "auto"  # scripts may read args.planner directly
    args = parser.parse_args(["--cache-dir", "/tmp/x", "--no-cache", "--mirror"])
    assert args.mirror is True and MirrorOptions.from_args(args).cache_dir is False
    on = argparse.ArgumentParser(parents=[option_parser(mirror_default=True)])
    assert on.parse_args([]).mirror is True and on.parse_args(["--no-mirror"]).mirror is False


def test_bad_values_fail_when_the_options_are_made():
    parser = argparse.ArgumentParser(parents=[option_parser()])
    with pytest.raises(BudgetError, match="60%"):
        MirrorOptions.from_args(parser.parse_args(["--memory-budget", "lots"]))
    with pytest.raises(SystemExit):  # argparse refuses an unknown planner name (exit 2)
        parser.parse_args(["--planner", "magic"])
    with pytest.raises(UnknownPlannerError):
        MirrorOptions.from_args(argparse.Namespace(mirror_planner="magic"))  # an old-style namespace


def test_a_scripts_own_flag_is_left_to_it():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ctx", default="gpu", help="the script's own device flag")
    add_arguments(parser)  # no argparse conflict
    args = parser.parse_args(["--ctx", "cpu", "--cost-ctx", "gpu:1", "--mirror"])
    assert args.ctx == "cpu" and args.cost_ctx == "gpu:1"
    assert MirrorOptions.from_args(args).cost_ctx == "gpu:1"


def test_only_restricts_the_options_added():
    parser = option_arguments(argparse.ArgumentParser(), switch=False, only=("cost_ctx",))
    assert parser.parse_args(["--ctx", "cpu"]).cost_ctx == "cpu"
    with pytest.raises(SystemExit):
        parser.parse_args(["--memory-budget", "min"])


def _option_strings(parser):
    return set(parser._option_string_actions)


VOCABULARY = {"--memory-budget", "--planner", "--cache-dir", "--no-cache", "--cost-ctx", "--keep-ops"}


def test_runner_cli_and_examples_share_the_vocabulary():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import train_lstm_bucketing  # noqa: F401
        import train_resnet
    finally:
        sys.path.pop(0)
    assert VOCABULARY <= _option_strings(runner_parser())
    commands = cli_parser()._subparsers._group_actions[0].choices
    for name in ("plan", "report"):
        assert VOCABULARY | {"--budget", "--ctx"} <= _option_strings(commands[name])
    assert {"--cost-ctx", "--keep-ops"} <= _option_strings(commands["pareto"])
    args = train_resnet.parse_args(FULL)
    assert args.mirror is True and MirrorOptions.from_args(args) == EXPECTED
    assert train_resnet.parse_args(["--no-mirror"]).mirror is False
    args = runner_parser().parse_args(FULL + ["train.py", "--epochs", "1"])
    assert MirrorOptions.from_args(args) == EXPECTED and args.script_args == ["--epochs", "1"]
    args = commands["plan"].parse_args(["net.json", "--shape", "data=1,2"] + OLD)
    assert MirrorOptions.from_args(args) == EXPECTED


# ----------------------------------------------------------- one signature source
def _surfaces():
    from mxnet_mirror_hook import MirroredBucketingModule, MirroredModule, plan_mirror
    from mxnet_mirror_hook.gluon import MirroredTrainer, mirror

    return [MirroredModule, MirroredBucketingModule, plan_mirror, mirror, MirroredTrainer]


def _declared_parameters(surface):
    """The parameters the surface's code declares (not the signature takes_options shows)."""
    code = (surface.__init__ if isinstance(surface, type) else surface).__code__
    count = code.co_argcount + code.co_kwonlyargcount
    return set(code.co_varnames[:count])


@pytest.mark.parametrize("surface", _surfaces(), ids=lambda s: s.__name__)
def test_every_surface_takes_the_options_from_the_one_table_not_its_own_keywords(surface):
    from mxnet_mirror_hook.options import OPTION_NAMES

    assert not _declared_parameters(surface) & set(OPTION_NAMES), surface.__name__


def test_every_public_surface_taking_options_is_in_the_list_above():
    import inspect

    import mxnet_mirror_hook
    import mxnet_mirror_hook.gluon as gluon_surfaces

    found = set()
    for module in (mxnet_mirror_hook, gluon_surfaces):
        for name in module.__all__:
            value = getattr(module, name)
            if callable(value) and not isinstance(value, type(mxnet_mirror_hook)):
                try:
                    parameters = inspect.signature(value).parameters
                except (TypeError, ValueError):
                    continue
                if "options" in parameters and "memory_budget" in parameters:
                    found.add(value)
    assert found == set(_surfaces())


@pytest.mark.parametrize("surface", _surfaces(), ids=lambda s: s.__name__)
def test_every_surface_takes_every_option_by_keyword_and_documents_it(surface):
    import inspect

    from mxnet_mirror_hook.options import OPTION_NAMES

    parameters = inspect.signature(surface).parameters
    assert "options" in parameters
    for name in OPTION_NAMES:
        assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert f"    {name} : " in surface.__doc__, f"{surface.__name__} does not document {name}"


def test_the_options_docstring_lists_every_field():
    import dataclasses

    fields = [f.name for f in dataclasses.fields(MirrorOptions)]
    from mxnet_mirror_hook.options import OPTION_NAMES

    assert tuple(fields) == OPTION_NAMES
    for name in fields:
        assert f"    {name} : " in MirrorOptions.__doc__


def test_a_surface_refuses_an_unknown_option_and_names_the_known_ones():
    from mxnet_mirror_hook import MirroredModule
    import mxnet as mx

    symbol = mx.sym.SoftmaxOutput(mx.sym.FullyConnected(mx.sym.var("data"), num_hidden=2), name="softmax")
    with pytest.raises(TypeError, match="memory_budget"):
        MirroredModule(symbol, memory_bugdet="min")
    module = MirroredModule(symbol, memory_budget="min", keep_ops="BatchNorm")
    assert module.mirror_options == MirrorOptions(memory_budget="min", keep_ops=("BatchNorm",))


def test_the_old_ctx_keyword_means_cost_ctx_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="cost_ctx"):
        options = MirrorOptions.coerce(ctx="cpu")
    assert options.cost_ctx == "cpu"


def test_an_option_out_of_range_is_an_option_error():
    from mxnet_mirror_hook.errors import OptionError

    with pytest.raises(OptionError, match="backend"):
        MirrorOptions(backend="fast")
    with pytest.raises(OptionError, match="segments"):
        MirrorOptions(segments=0)


def test_every_option_has_a_command_line_flag():
    from mxnet_mirror_hook.options import OPTION_NAMES

    parser = option_arguments(argparse.ArgumentParser(), switch=False)
    destinations = {action.dest for action in parser._actions}
    assert set(OPTION_NAMES) <= destinations
