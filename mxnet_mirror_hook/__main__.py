"""``python -m mxnet_mirror_hook``: a subcommand (``plan``, ``report``, ``pareto``) or a training
script to run mirrored (``--help`` shows the script runner's options; ``plan --help`` a command's).

    python -m mxnet_mirror_hook plan net-symbol.json --shape data=32,3,224,224
    python -m mxnet_mirror_hook --memory-budget 0.5 train.py --epochs 10
"""
import sys

from .tools.cli import SUBCOMMANDS, main as cli_main


def _dispatch(argv):
    if argv and (argv[0] in SUBCOMMANDS or argv[0] in ("-v", "--verbose")):
        return cli_main(argv)
    from .runner import main as run_main

    return run_main(argv)


sys.exit(_dispatch(sys.argv[1:]))
