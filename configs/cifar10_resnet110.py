"""ResNet-110 on CIFAR-10 with the He et al. (2015) recipe, warmed up at lr 0.01 for 400 steps as in the paper.

    resnet-jax train --config configs/cifar10_resnet110.py --workdir runs/cifar10_resnet110

Expected: 6.43% error best of 5, 6.61 +/- 0.16 mean (He et al. 2015, Table 6): final test_accuracy about 0.934.
Time: not measured; about 53 hours on 2 CPU cores (estimated): use a GPU.
"""

from configs import _cifar


def get_config():
    config = _cifar.get_config()
    config.model = "resnet110"
    config.warmup_steps = 400
    config.warmup_start_learning_rate = 0.01
    return config
