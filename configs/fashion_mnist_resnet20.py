"""ResNet-20 on Fashion-MNIST for about 3 epochs: the default job (`make demo`), sized for a 2-core CPU.

    resnet-jax train --config configs/fashion_mnist_resnet20.py --workdir runs/fashion_mnist_resnet20

Expected: final test_accuracy 0.9170 (seed 0).
Time: 5m38s-6m54s on 2 CPU cores; 4m00s-4m18s (0.9162) with --config.parallelism=batch_parts, as `make demo`
runs it (benchmarks/training-runs.md).
A run this short underfits, so it trades the random crop and strong weight decay of the long recipes for faster
fitting; flips stay.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "resnet20"
    config.dataset = "fashion_mnist"
    config.crop_padding = 0
    config.random_flip = True
    config.batch_size = 128
    config.num_train_steps = 1_500
    config.learning_rate = 0.2
    config.lr_schedule = "cosine"
    config.warmup_steps = 50
    config.weight_decay = 1e-4
    config.eval_every_steps = 750
    config.checkpoint_every_steps = 250
    return config
