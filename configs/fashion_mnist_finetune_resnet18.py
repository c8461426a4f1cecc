"""ResNet-18 with torchvision's ImageNet weights, fine-tuned on Fashion-MNIST at 32x32: transfer learning on a CPU.

    curl -LO https://download.pytorch.org/models/resnet18-f37072fd.pth   # torchvision's ResNet18_Weights.IMAGENET1K_V1
    resnet-jax convert --from-torch resnet18-f37072fd.pth --model resnet18 --out runs/torchvision_resnet18
    resnet-jax train --config configs/fashion_mnist_finetune_resnet18.py --workdir runs/fashion_mnist_finetune_resnet18

(`convert` reads .pth files with PyTorch: pip install torch.) The 28x28 grey images are resized to 32x32
(`image_size`): on 2 CPU cores a ResNet-18 train step measured about 52 images per CPU-second at 32x32 but only 9 at
48x48 and 64x64, so larger inputs take hours here; on an accelerator, --config.image_size=224 is the ImageNet input
size. The pretrained stem's kernel is summed over its RGB inputs: exactly the ImageNet net applied to the grey image
copied into three channels. A new 10-class head trains at the full rate, the stem and stages 1-4 at 0.1, 0.1, 0.3,
0.3 and 1.0 times it, and the BN statistics keep updating (Fashion-MNIST's are far from ImageNet's).
--config.freeze_backbone=true trains the head alone (a linear probe of the pre-logits); --config.bn_update=false
keeps the ImageNet statistics.
Expected: with the real ImageNet weights, not measured here (this machine cannot download them). From a converted
*random* torchvision ResNet-18 (the stand-in the tests use) the same command measured test_accuracy 0.8248: the
floor that pretrained weights should beat.
Time: about 8 minutes on 2 idle CPU cores (estimated: that run took 17 minutes, 8.4 CPU-minutes, on cores that
other jobs kept about twice as busy; ResNet-20 ran 2.2x below its idle speed beside them).
To check the weights and preprocessing first: resnet-jax predict --checkpoint runs/torchvision_resnet18 IMAGE.jpg
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
