"""``python -m resnet_jax.bench [ARGS]`` is ``resnet-jax bench [ARGS]``."""

import sys

from resnet_jax.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
