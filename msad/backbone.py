"""ResNet trunk returning C2..C5 (FCOS Sec. 3 / MSAD Sec. 4.1 use ResNet-50 on COCO).

Built from torchvision's own `BasicBlock` / `Bottleneck` so that a torchvision ImageNet state_dict
loads key for key. A `width` multiplier scales every stage, as in the slimmable ResNets of the
released MSAD model zoo (widths 1.0, 0.75, 0.5, 0.25); the CPU demo uses a narrow ResNet-18.
Nothing is downloaded: ImageNet weights come from a local file.
"""
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FrozenBatchNorm2d

DEPTHS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
          50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3))}
NORMS = ("frozen_bn", "bn", "syncbn", "gn")


def gn_groups(channels: int) -> int:
    """32 groups (Wu & He) where the width allows it, else the largest power of two with >= 2 channels each."""
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0 and channels // g >= 2 or g == 1)


def norm_layer(norm: str):
    """Norm constructor by name. SyncBN is plain BN here; runner.prepare_model converts it under DDP."""
    if norm == "frozen_bn":  # the COCO default: ImageNet statistics, no trainable affine
        return FrozenBatchNorm2d
    if norm in ("bn", "syncbn"):
        return nn.BatchNorm2d
    if norm == "gn":  # trains from scratch with small batches (the CPU demo)
        return lambda c: nn.GroupNorm(gn_groups(c), c)
    raise ValueError(f"--norm must be one of {NORMS}, got {norm!r}")


class ResNetTrunk(nn.Module):
    """torchvision-compatible ResNet without avgpool/fc; forward returns [C2, C3, C4, C5] (strides 4..32)."""

    def __init__(self, depth: int = 50, norm: str = "frozen_bn", width: float = 1.0, freeze_at: int = 0,
                 stride_in_1x1: bool = False):
        """stride_in_1x1: put a downsampling Bottleneck's stride in its first 1x1 conv, as the MSRA ResNets of
        detectron2 and AdelaiDet do (torchvision, and the slimmable ResNets, put it in the 3x3 conv)."""
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"--backbone resnet{depth} is not supported; choose from {sorted(DEPTHS)}")
        block, layers = DEPTHS[depth]
        self._norm = norm_layer(norm)
        base = int(round(64 * width))
        self.conv1 = nn.Conv2d(3, base, 7, 2, 3, bias=False)
        self.bn1 = self._norm(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.inplanes = base
        self.layer1 = self._make_layer(block, base, layers[0], 1)
        self.layer2 = self._make_layer(block, base * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, base * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, base * 8, layers[3], 2)
        self.out_channels = [base * m * block.expansion for m in (1, 2, 4, 8)]  # C2..C5
        if stride_in_1x1:
            if block is not Bottleneck:
                raise ValueError(f"stride_in_1x1 needs a Bottleneck ResNet (50 or deeper), not resnet{depth}")
            for layer in (self.layer2, self.layer3, self.layer4):
                layer[0].conv1.stride, layer[0].conv2.stride = layer[0].conv2.stride, (1, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # torchvision's ResNet init
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.freeze(freeze_at)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       self._norm(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, norm_layer=self._norm)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, norm_layer=self._norm) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def freeze(self, freeze_at: int):
        """freeze_at=1 freezes the stem, 2 the stem and stage 1 (res2), detectron2's FREEZE_AT convention."""
        stages = [[self.conv1, self.bn1], [self.layer1]][:freeze_at]
        for module in (m for stage in stages for m in stage):
            for p in module.parameters():
                p.requires_grad_(False)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # B x c x H/4 x W/4
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)  # B x 8c x H/32 x W/32
        return [c2, c3, c4, c5]


def load_imagenet_weights(trunk: ResNetTrunk, path: str) -> None:
    """Load a torchvision ResNet state_dict from a local file; any mismatch is one clear error."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"--backbone-weights {path}: file not found") from None
    except Exception as e:  # not a tensor-only file (a pickle with code, garbage, truncated)
        raise ValueError(f"--backbone-weights {path}: not a loadable state_dict ({type(e).__name__})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = trunk.state_dict()
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own and not k.endswith("num_batches_tracked"))  # FrozenBN has none
    shape = sorted(k for k in own if k in state and own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        parts = [f"{name}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                 for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape)) if keys]
        raise ValueError(f"--backbone-weights {path} does not fit this backbone ({'; '.join(parts)})")
    trunk.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)

