"""Wide ResNet WRN-28-10 on CIFAR-10 (Zagoruyko & Komodakis 2016), without dropout.

    resnet-jax train --config configs/cifar10_wrn28_10.py --workdir runs/cifar10_wrn28_10

The paper's recipe: 200 epochs of the 50k images at batch 128 (78,000 steps), Nesterov momentum 0.9, weight decay 5e-4,
lr 0.1 times 0.2 at epochs 60, 120 and 160, pad-4 crop and flip.
Expected: 4.00% error (the paper, no dropout): final test_accuracy about 0.960.
Time: not measured; weeks on a CPU (5.25 GMACs per image): use a GPU.
"""

from configs import _cifar


def get_config():
    config = _cifar.get_config()
    config.model = "wrn28_10"
    config.train_split = "train"
    config.num_train_steps = 200 * 390
    config.nesterov = True
    config.weight_decay = 5e-4
    config.lr_boundaries_steps = ()
    config.lr_boundaries_epochs = (60, 120, 160)
    config.lr_decay_factor = 0.2
    return config
