"""Time to 94% test accuracy on Fashion-MNIST: the WRN-16-2 recipe, evaluated every epoch, stopped at 0.94.

    resnet-jax train --config configs/fashion_mnist_time_to_94.py --workdir runs/fashion_mnist_time_to_94

Expected: stops at step 7020 (epoch 15.0) with test_accuracy 0.9406 (seed 0) and prints the step and wall time.
Time: 42m02s on 2 CPU cores, 31m25s with --config.parallelism=batch_parts; 88 s on one H100 with
--config.data_on_device=True --config.steps_per_call=12 --config.log_every_steps=156 (benchmarks/training-runs.md).
"""

from configs import fashion_mnist_wrn16_2


def get_config():
    config = fashion_mnist_wrn16_2.get_config()
    config.eval_every_steps = fashion_mnist_wrn16_2.STEPS_PER_EPOCH
    config.stop_at_test_accuracy = 0.94
    return config
