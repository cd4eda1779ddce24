"""Feature pyramid network (Lin et al. 2017) that emits only the levels a branch asks for.

MSAD Sec. 3.1: a branch on the full image uses P3..P7, a branch on the half-size image uses P2..P6,
so the same FPN must be able to produce any contiguous subset of P2..P7 without computing the rest.
"""
import torch.nn.functional as F
from torch import nn


class FPN(nn.Module):
    """Laterals on C2..C5 (only those the levels need), top-down sum, 3x3 outputs, P6/P7 by stride-2 convs.

    `p6_from="c5"` follows the released MSAD code; `"p5"` follows FCOS/torchvision. No norm (FPN, as released).
    """

    def __init__(self, in_channels, out_channels=256, levels=range(3, 8), p6_from="c5"):
        super().__init__()
        if p6_from not in ("c5", "p5"):
            raise ValueError(f"--p6-from must be 'c5' or 'p5', got {p6_from!r}")
        self.levels = tuple(sorted(levels))
        self.p6_from = p6_from
        low = min(self.levels[0], 5)
        self.lateral = nn.ModuleDict({f"p{l}": nn.Conv2d(in_channels[l - 2], out_channels, 1) for l in range(low, 6)})
        self.output = nn.ModuleDict({f"p{l}": nn.Conv2d(out_channels, out_channels, 3, padding=1) for l in range(low, 6)})
        if self.levels[-1] >= 6:
            self.p6 = nn.Conv2d(in_channels[3] if p6_from == "c5" else out_channels, out_channels, 3, 2, 1)
        if self.levels[-1] >= 7:
            self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):  # detectron2 / torchvision FPN init
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, feats, levels):
        """feats = [C2, C3, C4, C5]; returns [P_l for l in levels] (each B x out x H/2^l x W/2^l)."""
        levels = tuple(levels)
        if not set(levels) <= set(self.levels):
            raise ValueError(f"FPN built for levels {self.levels}, asked for {levels}")
        low = min(levels[0], 5)
        out = {}
        top = self.lateral["p5"](feats[3])
        need_p5 = 5 in levels or (self.p6_from == "p5" and 6 in levels)
        out[5] = self.output["p5"](top) if need_p5 else None
        for l in range(4, low - 1, -1):  # top-down: upsample to the lateral's exact size (Sec. 3.1: no forced match)
            lat = self.lateral[f"p{l}"](feats[l - 2])
            top = lat + F.interpolate(top, size=lat.shape[-2:], mode="nearest")
            out[l] = self.output[f"p{l}"](top)
        if 6 in levels:
            out[6] = self.p6(feats[3] if self.p6_from == "c5" else out[5])
        if 7 in levels:
            out[7] = self.p7(F.relu(out[6]))
        return [out[l] for l in levels]
