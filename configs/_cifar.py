"""He et al. (2015) CIFAR-10 recipe shared by the CIFAR configs (not an experiment by itself).

SGD, momentum 0.9, weight decay 1e-4, batch 128, lr 0.1 divided by 10 at 32k and 48k iterations,
stop at 64k; trained on 45k images (the other 5k are the paper's validation set), pad-4 random crop
and horizontal flip. Per-channel normalisation replaces the paper's per-pixel mean subtraction.
On a GPU, add `--config.data_on_device=True --config.steps_per_call=10` (docs/training.md).
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config()
    config.dataset = "cifar10"
    config.train_split = "train[:45000]"
    config.crop_padding = 4
    config.random_flip = True
    config.batch_size = 128
    config.eval_batch_size = 1000
    config.num_train_steps = 64_000
    config.learning_rate = 0.1
    config.lr_schedule = "step"
    config.lr_boundaries_steps = (32_000, 48_000)
    config.weight_decay = 1e-4
    config.eval_every_steps = 2_000
    config.checkpoint_every_steps = 2_000
    config.log_every_steps = 100
    return config
