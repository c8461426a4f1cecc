"""Pre-activation bottleneck ResNet-164 on CIFAR-10 (He et al. 2016, "Identity Mappings").

    resnet-jax train --config configs/cifar10_preact_resnet164.py --workdir runs/cifar10_preact_resnet164

The He et al. (2015) schedule (configs/_cifar.py) on all 50k images, with the paper's 400-step warm-up from lr 0.01.
Expected: 5.46% error (He et al. 2016): final test_accuracy about 0.945.
Time: not measured; about 52 hours on 2 CPU cores (estimated): use a GPU.
"""

from configs import _cifar


def get_config():
    config = _cifar.get_config()
    config.model = "preact_resnet164"
    config.train_split = "train"
    config.warmup_steps = 400
    config.warmup_start_learning_rate = 0.01
    return config
