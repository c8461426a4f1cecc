"""The results gallery's training recipe: one recipe for plain and residual nets of
20, 56 and 110 layers on Fashion-MNIST, trained to the end of a cosine schedule.

    resnet-jax analyze degradation --config configs/gallery_fashion_mnist.py --out runs/gallery
    resnet-jax train --config configs/gallery_fashion_mnist.py --config.model=resnet110 --workdir runs/resnet110

The first trains plain and residual nets of 20, 56 and 110 layers (resumable) into runs/gallery/runs/<model>, where
the gallery's analyses read them (docs/results.md), and plots their error curves; the second trains one alone.

Expected and time, 2 shared CPU cores with --config.parallelism=batch_parts: resnet56 92.59% test accuracy in 63
min, plain56 87.77% in 49 min; docs/results.md gives every model's accuracy and training time.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "resnet110"  # one run alone (`resnet-jax train`); the gallery trains every depth below
    config.depths = (20, 56, 110)  # `analyze degradation` trains plain and residual nets at each, in OUT/runs/<model>
    config.dataset = "fashion_mnist"
    config.crop_padding = 0  # flips only: the training error measures fitting (He et al.'s Fig. 6 signal)
    config.random_flip = True
    config.batch_size = 128
    config.num_train_steps = 2_345  # 5 epochs of 60,000 images
    config.learning_rate = 0.1
    config.lr_schedule = "cosine"
    config.warmup_steps = 400  # He et al. warm ResNet-110 up at lr 0.01 for about 400 steps
    config.warmup_start_learning_rate = 0.01
    config.weight_decay = 1e-4
    config.grad_clip_norm = 5.0  # a 110-layer run spiked to divergence near the peak rate without it
    config.log_every_steps = 25
    config.eval_every_steps = 469  # every epoch
    config.checkpoint_every_steps = 117  # 20 checkpoints along training: the trajectory tool reads them all
    config.keep_checkpoints = 100
    return config
