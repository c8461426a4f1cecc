"""ResNet-20 on Fashion-MNIST: the README's default job (`make demo`), sized for a 2-core CPU.

    resnet-jax train --config configs/fashion_mnist_resnet20.py --workdir runs/fashion_mnist_resnet20

About 3 epochs. A run this short underfits (training and test accuracy stay level), so it trades
the random crop and strong weight decay of the long recipes for faster fitting; flips stay.
Expected: final test_accuracy 0.9145 (seed 0; test accuracy 0.8652 at step 750).
Time: 6m29s to 6m37s wall for the command above on 2 idle CPU cores, start to final line (compile 7 s,
about 480-640 img/s for the train step); 7m59s in the same hour before host memory was kept for reuse.
One process per core is faster on a CPU: adding `--cpu-processes 2 --config.parallelism=pmap` gave final
test_accuracy 0.9120 in 5m30s to 5m40s (570-740 img/s; each process normalises over its 64 images).
The host's speed drifts from hour to hour; earlier hours gave 6m32s to 8m24s for one process.
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
