"""ResNet-20 on Fashion-MNIST: the README's default job, sized for a 2-core CPU.

    resnet-jax train --config configs/fashion_mnist_resnet20.py --workdir runs/fashion_mnist_resnet20

Expected: final test_accuracy >= 0.91 in under 10 minutes on 2 CPU cores (measured in the training
issue's note).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "resnet20"
    config.dataset = "fashion_mnist"
    config.crop_padding = 2
    config.batch_size = 128
    config.num_train_steps = 1_200
    config.learning_rate = 0.2
    config.lr_schedule = "cosine"
    config.warmup_steps = 50
    config.weight_decay = 5e-4
    config.eval_every_steps = 400
    config.checkpoint_every_steps = 400
    return config
