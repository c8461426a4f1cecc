"""Time to 94% test accuracy on Fashion-MNIST: the WRN-16-2 recipe, evaluated every epoch, stopped at 0.94.

    resnet-jax train --config configs/fashion_mnist_time_to_94.py --workdir runs/fashion_mnist_time_to_94

Training is configs/fashion_mnist_wrn16_2.py's step for step; only the test set is evaluated every epoch,
and the run stops at the first evaluation that reaches 0.94. The last lines give the step and the wall time
of the run (start to that evaluation: loading, compiling and the evaluations count), and every record of
metrics.jsonl has its elapsed_s. A rerun of the command on the same workdir reports the stop and trains no
further; `--config.stop_at_test_accuracy=0` goes on to the recipe's end.
Expected: TBD
Time: TBD
"""

from configs import fashion_mnist_wrn16_2


def get_config():
    config = fashion_mnist_wrn16_2.get_config()
    config.eval_every_steps = fashion_mnist_wrn16_2.STEPS_PER_EPOCH
    config.stop_at_test_accuracy = 0.94
    return config
