"""Degradation on CIFAR-10 (He et al. 2015, Fig. 6): plain and residual nets of 20, 32, 44 and 56 layers,
all with the He et al. recipe of configs/_cifar.py.

    resnet-jax analyze degradation --config configs/degradation_cifar10.py --out analysis/degradation_cifar10

trains plain20 ... plain56 and resnet20 ... resnet56 (eight runs in OUT/runs/<model>, resumed if rerun)
and plots their training and test error side by side. One of its runs alone:

    resnet-jax train --config configs/degradation_cifar10.py --config.model=plain56 --workdir runs/plain56

Expected (He et al. 2015, Fig. 6; Table 6): plain nets' training error rises with depth (plain-56 above
plain-20 throughout training), residual nets' falls; residual test error about 8.75 / 7.51 / 7.17 / 6.97%.
Time: not measured. On 2 CPU cores about 8.5 hours per 20-layer run and 26 per 56-layer run (the
estimates of configs/cifar10_resnet20.py and cifar10_resnet56.py, scaled by multiply-adds in between):
about 140 hours (6 days) for all eight.
"""

from configs import _cifar


def get_config():
    config = _cifar.get_config()
    config.model = "plain56"  # each run swaps in its own model; this one is for `resnet-jax train`
    config.depths = (20, 32, 44, 56)
    return config
