"""ResNet-18 with torchvision's ImageNet weights, fine-tuned on Fashion-MNIST at 32x32: transfer learning on a CPU.

    curl -LO https://download.pytorch.org/models/resnet18-f37072fd.pth   # torchvision's ResNet18_Weights.IMAGENET1K_V1
    resnet-jax convert --from-torch resnet18-f37072fd.pth --model resnet18 --out runs/torchvision_resnet18
    resnet-jax train --config configs/fashion_mnist_finetune_resnet18.py --workdir runs/fashion_mnist_finetune_resnet18

Expected: not measured with the real weights; from a converted *random* ResNet-18 the same command gives
test_accuracy 0.8248, the floor that pretrained weights should beat.
Time: about 8 minutes on 2 CPU cores (estimated).
The grey images are resized to 32x32 (larger inputs take hours on a CPU; --config.image_size=224 on an
accelerator) and the stem reads them by summing its kernel over RGB. The new head trains at the full rate, the
stem and stages 1-4 at 0.1, 0.1, 0.3, 0.3 and 1.0 times it, and BN statistics keep updating (Fashion-MNIST's are
far from ImageNet's). Other settings: docs/training.md, "Fine-tuning".
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model = "resnet18"
    config.dataset = "fashion_mnist"
    config.init_from = "runs/torchvision_resnet18"
    config.image_size = 32
    config.stage_lr_multipliers = (0.1, 0.1, 0.3, 0.3, 1.0)
    config.crop_padding = 0
    config.random_flip = True
    config.batch_size = 64
    config.num_train_steps = 300
    config.learning_rate = 0.05
    config.lr_schedule = "cosine"
    config.warmup_steps = 20
    config.weight_decay = 5e-5
    config.eval_every_steps = 300
    config.checkpoint_every_steps = 100
    return config
