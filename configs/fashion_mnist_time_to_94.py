"""Time to 94% test accuracy on Fashion-MNIST: the WRN-16-2 recipe, evaluated every epoch, stopped at 0.94.

    resnet-jax train --config configs/fashion_mnist_time_to_94.py --workdir runs/fashion_mnist_time_to_94

Training is configs/fashion_mnist_wrn16_2.py's step for step; only the test set is evaluated every epoch,
and the run stops at the first evaluation that reaches 0.94. The last lines give the step and the wall time
of the run (start to that evaluation: loading, compiling and the evaluations count), and every record of
metrics.jsonl has its elapsed_s. A rerun of the command on the same workdir reports the stop and trains no
further; `--config.stop_at_test_accuracy=0` goes on to the recipe's end.
Expected: stops at step 7020 (epoch 15.0) with test_accuracy 0.9406 (seed 0; 0.9229 / 0.8947 / 0.9347 after
epochs 12 / 13 / 14; the whole 20-epoch recipe ended at 0.9489).
Time on one H100: 88.2 s to 94% with the data on the device,

    resnet-jax train --config configs/fashion_mnist_time_to_94.py --workdir DIR --config.data_on_device=True \
        --config.steps_per_call=12 --config.log_every_steps=156 --config.compilation_cache_dir=CACHE

(step 7020, test_accuracy 0.9402; about 64 s of it compiling the train and eval steps; 60,900-62,200 img/s),
and 25.7 s when run again with the same CACHE (step 7488: runs on a GPU do not repeat bit for bit); 2m18s with
the host pipeline and a call per step (138.1 s: step 7020, test_accuracy 0.9405; 20,000-30,000 img/s).
42m02s on 2 CPU cores (2,522 s, loading, compiling and 15 evaluations included; 293-428 img/s, short
niced test runs beside it at times). With `--cpu-processes 2 --config.parallelism=pmap` (batch norm over each
process's 64 images): 94.22% at step 7488 (epoch 16.0; 0.9399 after epoch 15) after 32m42s, 425-566 img/s.
With `--config.parallelism=batch_parts` (one process, two batch parts of 64 side by side): 94.26% at step 7488
(epoch 16.0; 0.9388 after epoch 15) after 31m25s, 458-566 img/s (median 536).
"""

from configs import fashion_mnist_wrn16_2


def get_config():
    config = fashion_mnist_wrn16_2.get_config()
    config.eval_every_steps = fashion_mnist_wrn16_2.STEPS_PER_EPOCH
    config.stop_at_test_accuracy = 0.94
    return config
