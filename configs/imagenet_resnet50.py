"""ResNet-50 (v1.5) on ImageNet with the Goyal et al. (2017) large-batch recipe, bf16 compute.

    resnet-jax train --config configs/imagenet_resnet50.py --workdir runs/imagenet_resnet50 \
        --config.data_dir=/path/to/tensorflow_datasets

Needs imagenet2012 prepared by tfds (docs/data.md). 90 epochs at global batch 1024, lr 0.1 x batch / 256 with a
5-epoch linear warm-up, divided by 10 at epochs 30, 60 and 80; each block's last BN scale starts at zero.
Expected: top-1 test_accuracy about 0.763 (Goyal et al. 2017: 23.74% error; torchvision's v1.5 weights: 76.13%).
Time: not measured end to end; about 6 hours of train steps on one H100 (estimated from the bench's step).
"""

from configs import default

TRAIN_IMAGES = 1_281_167


def get_config():
    config = default.get_config()
    config.model = "resnet50"
    config.model_overrides.zero_init_residual = True
    config.dtype = "bfloat16"
    config.dataset = "imagenet2012"
    config.eval_split = "validation"
    config.batch_size = 1024
    config.eval_batch_size = 1000
    steps_per_epoch = TRAIN_IMAGES // config.batch_size
    config.num_train_steps = 90 * steps_per_epoch
    config.learning_rate = 0.1
    config.scale_learning_rate_by_batch = True
    config.warmup_steps = 5 * steps_per_epoch
    config.lr_schedule = "step"
    config.lr_boundaries_epochs = (30, 60, 80)
    config.weight_decay = 1e-4
    config.eval_every_steps = 5 * steps_per_epoch
    config.checkpoint_every_steps = steps_per_epoch
    config.log_every_steps = 100
    return config
