"""resnet56 on CIFAR-10 with the He et al. (2015) recipe (see configs/_cifar.py).

    resnet-jax train --config configs/cifar10_resnet56.py --workdir runs/cifar10_resnet56

Expected: 6.97% error (He et al. 2015, Table 6): final test_accuracy about 0.930.
Time: not measured; about 26 hours on 2 CPU cores (estimated).
"""

from configs import _cifar


def get_config():
    config = _cifar.get_config()
    config.model = "resnet56"
    return config
