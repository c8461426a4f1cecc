"""Degradation at small scale (He et al. 2015, Fig. 6): plain and residual nets of 8 and 20 layers on
Fashion-MNIST, one short recipe, sized for a 2-core CPU.

    resnet-jax analyze degradation --config configs/degradation_fashion_mnist.py --out analysis/degradation

trains plain8, plain20, resnet8 and resnet20 (each in OUT/runs/<model>, resumed if rerun) and plots
their training and test error side by side. One of its runs alone:

    resnet-jax train --config configs/degradation_fashion_mnist.py --config.model=plain20 --workdir runs/plain20

Expected (seed 0, measured): late training error (mean of the second half of training) plain 8: 16.96%,
20: 17.88% (worse with depth); resnet 8: 17.95%, 20: 17.11% (better with depth): "degradation shown".
Final test error plain8 17.6%, plain20 16.5%, resnet8 16.9%, resnet20 18.7%. The effect is about one
point, no larger than what another seed may move: a demonstration of the measurement, not a proof.
--config.depths=(8,20,44) adds the 44-layer pair (about 10 more minutes): plain44 trains far worse
(30.3%), but resnet44 also trails (21.0%): 300 steps (0.6 epochs) are too few for depth to pay even
with shortcuts, and the verdict is "no degradation shown".
Time: about 6-7 minutes on 2 idle CPU cores (estimated from the 9.2 CPU-minutes the four runs took;
their wall time, 47 minutes, was on 2 cores shared with four other jobs).
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
