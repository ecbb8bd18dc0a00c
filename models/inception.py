"""GoogLeNet / Inception-v1 (Szegedy et al. 2015), a multi-branch CNN, in plain torch.

The layout follows torchvision's ``googlenet`` (conv + BN + ReLU units, modules
3a, 3b, 4a-4e, 5a, 5b, auxiliary heads omitted) with one deliberate difference:
the third branch uses a 5x5 convolution as in the paper (torchvision uses a 3x3
there by a long-standing quirk). Each inception module concatenates four
branches with ``torch.cat``: 1x1 / 1x1 -> 3x3 / 1x1 -> 5x5 / 3x3 max-pool -> 1x1.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import image_input, init_cnn, seeded

__all__ = ["BasicConv2d", "Inception", "GoogLeNet", "inception"]


class BasicConv2d(nn.Module):
    """Convolution (no bias) -> BatchNorm (eps 1e-3) -> ReLU.

    Parameters
    ----------
    in_channels : int
        Input channels.
    out_channels : int
        Output channels.
    kernel_size : int
        Square kernel size.
    stride : int
        Convolution stride.
    padding : int
        Zero padding on each side.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply conv, BN and ReLU."""
        return self.relu(self.bn(self.conv(x)))


class Inception(nn.Module):
    """One inception module: four parallel branches concatenated along channels.

    Parameters
    ----------
    in_channels : int
        Input channels.
    ch1x1 : int
        Output channels of the 1x1 branch.
    ch3x3red, ch3x3 : int
        Reduction and output channels of the 1x1 -> 3x3 branch.
    ch5x5red, ch5x5 : int
        Reduction and output channels of the 1x1 -> 5x5 branch.
    pool_proj : int
        Output channels of the 3x3 max-pool -> 1x1 branch.
    """

    def __init__(
        self,
        in_channels: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
    ) -> None:
        super().__init__()
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(
            BasicConv2d(in_channels, ch3x3red, kernel_size=1),
            BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1),
        )
        self.branch3 = nn.Sequential(
            BasicConv2d(in_channels, ch5x5red, kernel_size=1),
            BasicConv2d(ch5x5red, ch5x5, kernel_size=5, padding=2),
        )
        self.branch4 = nn.Sequential(
            nn.MaxPool2d(kernel_size=3, stride=1, padding=1, ceil_mode=True),
            BasicConv2d(in_channels, pool_proj, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the four branches and concatenate them (channel dimension)."""
        b1 = self.branch1(x)
        b2 = self.branch2(x)
        b3 = self.branch3(x)
        b4 = self.branch4(x)
        return torch.cat([b1, b2, b3, b4], 1)


class GoogLeNet(nn.Module):
    """GoogLeNet without auxiliary classifiers.

    Parameters
    ----------
    num_classes : int
        Output width of the final fully connected layer.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = BasicConv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, kernel_size=1)
        self.conv3 = BasicConv2d(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = nn.MaxPool2d(3, stride=2, ceil_mode=True)

        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = nn.MaxPool2d(2, stride=2, ceil_mode=True)

        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128)

        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=0.2)
        self.fc = nn.Linear(1024, num_classes)
        init_cnn(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(N, 3, H, W)`` images to ``(N, num_classes)`` logits."""
        x = self.maxpool1(self.conv1(x))
        x = self.maxpool2(self.conv3(self.conv2(x)))
        x = self.inception3a(x)
        x = self.inception3b(x)
        x = self.maxpool3(x)
        x = self.inception4a(x)
        x = self.inception4b(x)
        x = self.inception4c(x)
        x = self.inception4d(x)
        x = self.inception4e(x)
        x = self.maxpool4(x)
        x = self.inception5a(x)
        x = self.inception5b(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        return self.fc(x)


def inception(batch: int = 1, image: int = 224) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """GoogLeNet / Inception-v1 (no auxiliary heads) and an example input.

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
        model = GoogLeNet().eval()
    return model, (image_input(batch, image),)
