"""The convolutional image tower: CLIP's ModifiedResNet or a torchvision backbone, pooled and projected."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from coembed.config import ImageConfig
from coembed.errors import ConfigError
from coembed.towers.layers import AttentionPool2d, HalvingAvgPool, image_pool, run_segment


def pool(stride: int) -> nn.Module:
    """The anti-aliasing average pool of a block with this stride (CLIP's blocks use 1 or 2)."""
    if stride == 1:
        return nn.Identity()
    return HalvingAvgPool() if stride == 2 else nn.AvgPool2d(stride)


class Bottleneck(nn.Module):
    """ResNet bottleneck with anti-aliased downsampling: stride is an avg-pool after the 3x3 conv."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = pool(stride)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # Keys "-1", "0", "1" match OpenAI CLIP's checkpoints.
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", pool(stride)),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class MixStyle(nn.Module):
    """MixStyle (Zhou et al., ICLR 2021), for styles never seen in training: with probability
    ``p`` per training batch, each image's per-channel feature mean and standard deviation (what
    a CNN's early stages hold of colour, texture and stroke) are replaced by a Beta(alpha, alpha)
    mix of its own and another image's of the batch; what the features say of shape stays. The
    statistics carry no gradient (the paper's choice). Identity in eval mode and at p = 0.

    Its draws (whether to mix, the weights, the partner) come from torch's CPU generator, which a
    checkpoint saves, so a resumed run mixes as an uninterrupted one; they are made on the CPU
    even when training on a GPU (no device sync, no device generator). The mixing runs in fp32.
    """

    def __init__(self, p: float, alpha: float = 0.1, eps: float = 1e-6) -> None:
        super().__init__()
        self.p, self.alpha, self.eps = p, alpha, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) features -> the same shape, styles mixed (sometimes, in training)."""
        B = x.shape[0]
        if not self.training or not self.p or B < 2 or float(torch.rand(())) >= self.p:
            return x
        weight = torch.distributions.Beta(self.alpha, self.alpha).sample((B, 1, 1, 1))
        partner = torch.randperm(B)
        features = x.float()
        mean = features.mean(dim=(2, 3), keepdim=True).detach()  # (B, C, 1, 1)
        std = (features.var(dim=(2, 3), keepdim=True) + self.eps).sqrt().detach()
        weight, partner = weight.to(x.device), partner.to(x.device)
        mixed_mean = weight * mean + (1 - weight) * mean[partner]
        mixed_std = weight * std + (1 - weight) * std[partner]
        return ((features - mean) / std * mixed_std + mixed_mean).to(x.dtype)


class ModifiedResNetTrunk(nn.Module):
    """CLIP's ResNet without its pooling: a 3-conv stem + avg-pool, then four bottleneck stages.

    Output: (B, width*32, image_size/32, image_size/32).
    """

    def __init__(self, layers: list[int], width: int, mixstyle: float = 0.0):
        super().__init__()
        self.mix = MixStyle(mixstyle)  # after the first and the second stage
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = HalvingAvgPool()
        self.relu = nn.ReLU(inplace=True)
        stages = []
        inplanes = width
        for i, blocks in enumerate(layers):
            planes = width * 2**i
            stage = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = inplanes
        for stage in stages:
            for block in stage:
                # Residual branches start near identity, as in CLIP.
                nn.init.zeros_(block.bn3.weight)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, width, S/4, S/4): three convolutions, then the halving pool."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.avgpool(self.relu(self.bn3(self.conv3(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(self.layer1(self.stem(x)))
        return self.layer4(self.layer3(self.mix(self.layer2(x))))

    def segments(self) -> list[tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module]]:
        """The trunk as a chain of (function, the module it runs): the stem, then every block
        (and the style mixing after the first two stages)."""
        chain: list[tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module]] = [(self.stem, self)]
        for i, stage in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)):
            chain += [(block, block) for block in stage]
            if i < 2:
                chain.append((self.mix, self.mix))
        return chain

    def groups(self) -> list[nn.Module]:
        """Parameter groups from input to output, for lock-with-unlocked-last-groups."""
        stem = nn.ModuleList([self.conv1, self.bn1, self.conv2, self.bn2, self.conv3, self.bn3])
        return [stem, self.layer1, self.layer2, self.layer3, self.layer4]


def torchvision_trunk(name: str) -> tuple[nn.Module, list[nn.Module]]:
    """A torchvision classification model without its head, and its stages in order."""
    import torchvision

    try:
        net = torchvision.models.get_model(name, weights=None)
    except ValueError:
        families = "resnet*, convnext_*, efficientnet_*, mobilenet_*, regnet_*"
        raise ConfigError(
            f"model.image.backbone: unknown backbone {name!r} (modified_resnet or torchvision {families})"
        ) from None
    if hasattr(net, "layer4"):  # ResNet / ResNeXt / Wide ResNet
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        stages = [stem, net.layer1, net.layer2, net.layer3, net.layer4]
        return nn.Sequential(*stages), stages
    if hasattr(net, "trunk_output"):  # RegNet
        stages = [net.stem, *net.trunk_output]
        return nn.Sequential(*stages), stages
    if hasattr(net, "features"):  # ConvNeXt, EfficientNet, MobileNet
        stages = list(net.features)
        return net.features, stages
    raise ConfigError(f"model.image.backbone: {name!r} is not a supported convolutional backbone")


class ImageTower(nn.Module):
    grad_checkpointing = False  # recompute each trunk segment's activations in the backward pass

    def __init__(self, cfg: ImageConfig, output_dim: int):
        super().__init__()
        self.cfg = cfg
        if cfg.backbone == "modified_resnet":
            self.trunk = ModifiedResNetTrunk(cfg.layers, cfg.width, cfg.mixstyle)
            self._groups = self.trunk.groups()
            channels, spatial = self.trunk.out_channels, cfg.image_size // 32
        else:
            self.trunk, self._groups = torchvision_trunk(cfg.backbone)
            with torch.no_grad():
                probe = self.trunk.eval()(torch.zeros(1, 3, cfg.image_size, cfg.image_size))
            self.trunk.train()
            channels, spatial = probe.shape[1], probe.shape[2]
            if probe.shape[2] != probe.shape[3]:
                raise ConfigError("model.image.image_size gives a non-square feature map")
        self.pool = image_pool(cfg.pool, spatial, channels, cfg.heads, output_dim)
        if isinstance(self.pool, AttentionPool2d):
            std = channels**-0.5
            for lin in (self.pool.q_proj, self.pool.k_proj, self.pool.v_proj, self.pool.c_proj):
                nn.init.normal_(lin.weight, std=std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalized images -> (B, output_dim) unnormalized features."""
        if not (self.grad_checkpointing and torch.is_grad_enabled()):
            return self.pool(self.trunk(images))
        if isinstance(self.trunk, ModifiedResNetTrunk):
            segments = self.trunk.segments()
        else:  # a torchvision trunk: a Sequential of its stages
            segments = [(stage, stage) for stage in self.trunk]
        x = images
        for function, module in segments:
            x = run_segment(function, module, x, recompute=True)
        return self.pool(x)

    def lock(self, unlocked_groups: int = 0) -> None:
        """Freeze the tower except its last ``unlocked_groups`` stages (pooling counts as one).

        Frozen BatchNorm layers also stop updating their running statistics.
        """
        groups = [*self._groups, self.pool]
        for p in self.parameters():
            p.requires_grad_(False)
        frozen = groups[: max(len(groups) - unlocked_groups, 0)]
        for group in groups[len(frozen) :]:
            group.requires_grad_(True)
        self._frozen_norms = [
            m for g in frozen for m in g.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        self.train(self.training)

    def train(self, mode: bool = True) -> ImageTower:
        super().train(mode)
        for m in getattr(self, "_frozen_norms", []):
            m.eval()
        return self
