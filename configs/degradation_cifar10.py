"""Degradation on CIFAR-10 (He et al. 2015, Fig. 6): plain and residual nets of 20, 32, 44 and 56 layers,
all with the He et al. recipe of configs/_cifar.py.

    resnet-jax analyze degradation --config configs/degradation_cifar10.py --out analysis/degradation_cifar10
    resnet-jax train --config configs/degradation_cifar10.py --config.model=plain56 --workdir runs/plain56

The first trains the eight nets (each in OUT/runs/<model>, resumed if rerun) and plots their training and
test error; the second is one of its runs alone.
Expected (He et al. 2015, Fig. 6 and Table 6): plain nets' training error rises with depth, residual nets'
falls; residual test error about 8.75 / 7.51 / 7.17 / 6.97%.
Time: not measured; about 140 hours on 2 CPU cores for all eight (estimated): use a GPU.
"""

from configs import _cifar


def get_config():
    config = _cifar.get_config()
    config.model = "plain56"  # each run swaps in its own model; this one is for `resnet-jax train`
    config.depths = (20, 32, 44, 56)
    return config
