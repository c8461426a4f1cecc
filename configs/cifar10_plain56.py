"""plain56 on CIFAR-10 with the He et al. (2015) recipe (see configs/_cifar.py).

    resnet-jax train --config configs/cifar10_plain56.py --workdir runs/cifar10_plain56

Expected: about 13% error, worse than plain20, the degradation problem (Li et al. 2018: 13.31%; He et al.
2015, Fig. 6): final test_accuracy about 0.87.
Time: not measured; as cifar10_resnet56 (same layers), about 26 hours on 2 CPU cores (estimated).
"""

from configs import _cifar


def get_config():
    config = _cifar.get_config()
    config.model = "plain56"
    return config
