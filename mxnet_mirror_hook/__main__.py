"""``python -m mxnet_mirror_hook`` runs the ``mxnet-mirror`` command line."""
import sys

from .cli import main

sys.exit(main())
