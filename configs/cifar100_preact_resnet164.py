"""Pre-activation bottleneck ResNet-164 on CIFAR-100 (He et al. 2016, "Identity Mappings").

    resnet-jax train --config configs/cifar100_preact_resnet164.py --workdir runs/cifar100_preact_resnet164

Same recipe as configs/cifar10_preact_resnet164.py, 100 classes.
Expected: 24.33% error (He et al. 2016): final test_accuracy about 0.757.
Time: not measured; about 52 hours on 2 CPU cores (estimated): use a GPU.
"""

from configs import cifar10_preact_resnet164


def get_config():
    config = cifar10_preact_resnet164.get_config()
    config.dataset = "cifar100"
    return config
