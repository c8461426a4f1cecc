"""PyTorch ResNets written independently of this package's Flax code: the benchmark's torch side and
the reference of ``tests/test_torch_equivalence.py``.

Written from scratch in plain ``torch.nn`` from the papers and the torchvision layout (not from
the Flax modules, and without torchvision), so that a mistake in the Flax models shows up as a
disagreement with these instead of being copied into them. The equivalence tests copy Flax
variables into these modules and compare logits; ``resnet-jax bench --vs-torch`` trains them
side by side with the Flax models.

* `ImageNetResNet`: He et al. (2015) ImageNet ResNets with torchvision's module names (``conv1``,
  ``bn1``, ``layer1.0.conv1``, ``layer1.0.downsample.0``/``.1``, ``fc``). 7x7/2 conv stem (padding
  3), BN, ReLU, 3x3/2 max-pool (padding 1), four stages, global average pool, linear head.
  `BasicBlock` and `Bottleneck`; the bottleneck is v1.5 (stride on the 3x3 conv) unless
  ``stride_in_1x1=True`` (v1, the original paper). Projection shortcuts (shortcut "B").
* `CifarResNet`: He et al. (2015), Section 4.2: 3x3 conv with 16 channels, BN, ReLU, three stages
  of n basic blocks with widths 16/32/64, global average pool, linear head. Shortcut "A":
  subsample ``x[:, :, ::2, ::2]`` and append zero channels after the existing ones.

BatchNorm everywhere uses eps 1e-5 and momentum 0.1 (torch's defaults).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from resnet_jax.extras import require

torch = require("torch")  # the [torch] extra; importing this module without it names the pip install to run
F = torch.nn.functional
nn = torch.nn

BN_EPS = 1e-5
BN_MOMENTUM = 0.1


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)


def batch_norm(planes: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(planes, eps=BN_EPS, momentum=BN_MOMENTUM)


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), two 3x3 convs, stride on the first."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = batch_norm(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = batch_norm(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4). v1.5 strides the 3x3 conv; v1 (stride_in_1x1) the first 1x1."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(inplanes, planes, stride_1x1)
        self.bn1 = batch_norm(planes)
        self.conv2 = conv3x3(planes, planes, stride_3x3)
        self.bn2 = batch_norm(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = batch_norm(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ImageNetResNet(nn.Module):
    """torchvision-layout ImageNet ResNet; ``layers`` is the number of blocks per stage."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
        stride_in_1x1: bool = False,
    ) -> None:
        super().__init__()
        if stride_in_1x1 and block is not Bottleneck:
            raise ValueError("stride_in_1x1 applies to Bottleneck blocks only.")
        self.block = block
        self.stride_in_1x1 = stride_in_1x1
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = batch_norm(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0], stride=1)
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        outplanes = planes * self.block.expansion
        downsample = None
        if stride != 1 or self.inplanes != outplanes:
            downsample = nn.Sequential(conv1x1(self.inplanes, outplanes, stride), batch_norm(outplanes))
        extra = {"stride_in_1x1": self.stride_in_1x1} if self.block is Bottleneck else {}
        layers = [self.block(self.inplanes, planes, stride, downsample, **extra)]
        self.inplanes = outplanes
        layers += [self.block(self.inplanes, planes, **extra) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


class PadShortcut(nn.Module):
    """Shortcut "A": keep every ``stride``-th pixel, then append zero channels after the input's."""

    def __init__(self, planes: int, stride: int) -> None:
        super().__init__()
        self.planes = planes
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        # F.pad pads the last axes first: (W left, W right, H top, H bottom, C front, C back).
        return F.pad(x, (0, 0, 0, 0, 0, self.planes - x.shape[1]))


class CifarBasicBlock(nn.Module):
    """Basic block of the CIFAR ResNets, with the parameter-free shortcut "A"."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = batch_norm(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = batch_norm(planes)
        self.relu = nn.ReLU()
        self.shortcut = PadShortcut(planes, stride) if stride != 1 or inplanes != planes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al. (2015) CIFAR ResNet with 6n+2 layers (n = ``blocks_per_stage``)."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = conv3x3(3, 16)
        self.bn1 = batch_norm(16)
        self.relu = nn.ReLU()
        inplanes, stages = 16, []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [CifarBasicBlock(inplanes, planes, stride)]
            blocks += [CifarBasicBlock(planes, planes) for _ in range(1, blocks_per_stage)]
            stages.append(nn.Sequential(*blocks))
            inplanes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = x.mean(dim=(2, 3))
        return self.fc(x)


def resnet18(num_classes: int = 1000) -> ImageNetResNet:
    return ImageNetResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet34(num_classes: int = 1000) -> ImageNetResNet:
    return ImageNetResNet(BasicBlock, [3, 4, 6, 3], num_classes)


def resnet50(num_classes: int = 1000) -> ImageNetResNet:
    return ImageNetResNet(Bottleneck, [3, 4, 6, 3], num_classes)


def resnet50_v1(num_classes: int = 1000) -> ImageNetResNet:
    return ImageNetResNet(Bottleneck, [3, 4, 6, 3], num_classes, stride_in_1x1=True)


def cifar_resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    n, remainder = divmod(depth - 2, 6)
    if remainder or n < 1:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2; got {depth}.")
    return CifarResNet(n, num_classes)


IMAGENET = {"resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50, "resnet50_v1": resnet50_v1}


def create(name: str, num_classes: int) -> nn.Module:
    """The counterpart of ``resnet_jax.create_model(name)``: an ImageNet preset above or a CIFAR resnet<6n+2>."""
    return constructor(name)(num_classes)


def constructor(name: str) -> Callable[[int], nn.Module]:
    """The function that builds ``name`` with a given number of classes; ValueError if there is none."""
    if name in IMAGENET:
        return IMAGENET[name]
    depth = name.removeprefix("resnet")
    if depth.isdigit():
        return partial(cifar_resnet, int(depth))
    raise ValueError(
        f"No PyTorch counterpart of {name!r} for --vs-torch; use {', '.join(IMAGENET)} or a CIFAR resnet<6n+2> "
        "such as resnet20."
    )
