"""resnet20 on CIFAR-10 with the He et al. (2015) recipe (see configs/_cifar.py).

    resnet-jax train --config configs/cifar10_resnet20.py --workdir runs/cifar10_resnet20

Expected: 8.75% error (He et al. 2015, Table 6): final test_accuracy about 0.912.
Time: not measured; about 8.5 hours on 2 CPU cores (estimated). On a GPU add
`--config.data_on_device=True --config.steps_per_call=10`: the host pipeline cannot keep up there.
"""

from configs import _cifar


def get_config():
    config = _cifar.get_config()
    config.model = "resnet20"
    return config
