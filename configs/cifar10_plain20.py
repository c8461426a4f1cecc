"""plain20 on CIFAR-10 with the He et al. (2015) recipe (see configs/_cifar.py).

    resnet-jax train --config configs/cifar10_plain20.py --workdir runs/cifar10_plain20

Expected: about 8.2% error (Li et al. 2018: 8.18% without skip connections): final test_accuracy about 0.92.
Time: not measured; as cifar10_resnet20 (same layers), about 8.5 hours on 2 CPU cores (estimated).
"""

from configs import _cifar


def get_config():
    config = _cifar.get_config()
    config.model = "plain20"
    return config
