"""Pre-activation bottleneck ResNet-164 on CIFAR-10 (He et al. 2016, "Identity Mappings").

    resnet-jax train --config configs/cifar10_preact_resnet164.py --workdir runs/cifar10_preact_resnet164

Recipe of the paper: the He et al. (2015) schedule (lr 0.1, /10 at 32k and 48k, 64k steps, batch
128, weight decay 1e-4) with a 400-step warm-up from lr 0.01.
Expected: 5.46% error (He et al. 2016): final test_accuracy about 0.945.
Time: not yet measured on a GPU; about 52 hours on 2 CPU cores (estimated from the measured ResNet-20
step rate scaled by multiply-adds): use a GPU.
"""

from configs import _cifar


def get_config():
    config = _cifar.get_config()
    config.model = "preact_resnet164"
    config.train_split = "train"
    config.warmup_steps = 400
    config.warmup_start_learning_rate = 0.01
    return config
