"""ResNet-18 and ResNet-50 with torchvision-equivalent structure, in plain torch.

The module tree, parameter names and parameter count match
``torchvision.models.resnet18`` / ``resnet50`` (ResNet v1.5: the stride of a
bottleneck sits in its 3x3 convolution), so a torchvision state dict loads
into these models unchanged. ReLUs are not in place (``nn.ReLU()``), so no
operator mutates a tensor another operator reads: safe for partitioned runs.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import image_input, init_cnn, seeded

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet50"]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution with no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34).

    Parameters
    ----------
    inplanes : int
        Input channels.
    planes : int
        Output channels (``expansion`` is 1).
    stride : int
        Stride of the first convolution.
    downsample : nn.Module or None
        Projection applied to the shortcut when shapes differ.
    """

    expansion: int = 1

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 bottleneck with a residual connection (ResNet-50+).

    Parameters
    ----------
    inplanes : int
        Input channels.
    planes : int
        Width of the bottleneck; the block outputs ``planes * 4`` channels.
    stride : int
        Stride of the 3x3 convolution.
    downsample : nn.Module or None
        Projection applied to the shortcut when shapes differ.
    """

    expansion: int = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block."""
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu(out)


class ResNet(nn.Module):
    """ResNet backbone and classifier (torchvision layout).

    Parameters
    ----------
    block : type[BasicBlock] or type[Bottleneck]
        Residual block class.
    layers : list[int]
        Number of blocks in each of the four stages.
    num_classes : int
        Output width of the final fully connected layer.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"ResNet needs 4 stage depths, got {layers}")
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_cnn(self)

    def _make_layer(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
    ) -> nn.Sequential:
        downsample: nn.Module | None = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers: list[nn.Module] = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, 3, H, W)`` images to ``(N, num_classes)`` logits."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet50(batch: int = 1, image: int = 224) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """ResNet-50 (Bottleneck, [3, 4, 6, 3]; 25,557,032 parameters) and an example input.

    Parameters
    ----------
    batch : int
        Batch size of the example input.
    image : int
        Side of the square example image (at least 32).

    Returns
    -------
    tuple[nn.Module, tuple[torch.Tensor, ...]]
        The model in eval mode and ``(images,)`` of shape ``(batch, 3, image, image)``.
    """
    with seeded():
        model = ResNet(Bottleneck, [3, 4, 6, 3]).eval()
    return model, (image_input(batch, image),)


def resnet18(batch: int = 1, image: int = 224) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]; 11,689,512 parameters) and an example input.

    Parameters
    ----------
    batch : int
        Batch size of the example input.
    image : int
        Side of the square example image (at least 32).

    Returns
    -------
    tuple[nn.Module, tuple[torch.Tensor, ...]]
        The model in eval mode and ``(images,)`` of shape ``(batch, 3, image, image)``.
    """
    with seeded():
        model = ResNet(BasicBlock, [2, 2, 2, 2]).eval()
    return model, (image_input(batch, image),)
