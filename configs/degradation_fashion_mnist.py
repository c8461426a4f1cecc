"""Degradation at small scale (He et al. 2015, Fig. 6): plain and residual nets of 8 and 20 layers on
Fashion-MNIST, one short recipe, sized for a 2-core CPU.

    resnet-jax analyze degradation --config configs/degradation_fashion_mnist.py --out analysis/degradation
    resnet-jax train --config configs/degradation_fashion_mnist.py --config.model=plain20 --workdir runs/plain20

The first trains plain8, plain20, resnet8 and resnet20 (each in OUT/runs/<model>, resumed if rerun) and plots
their training and test error; the second is one of its runs alone.
Expected (seed 0): "He et al.'s Fig. 6 reproduces": plain nets' training error rises with depth and residual
nets' falls, by about one point, no more than another seed may move (benchmarks/training-runs.md).
Time: about 6-7 minutes on 2 CPU cores (estimated).
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "plain20"  # each run swaps in its own model; this one is for `resnet-jax train`
    config.depths = (8, 20)
    config.dataset = "fashion_mnist"
    config.crop_padding = 0  # no augmentation but flips: training error measures fitting, not robustness
    config.random_flip = True
    config.batch_size = 128
    config.num_train_steps = 300
    config.learning_rate = 0.1
    config.lr_schedule = "constant"
    config.warmup_steps = 0
    config.log_every_steps = 25
    config.eval_every_steps = 100
    config.checkpoint_every_steps = 100
    return config
