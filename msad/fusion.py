"""Crossing feature-level fusion, C-FF (MSAD Sec. 3.3).

For each aligned pair (P^H, P^L) of B x C x h x w maps: concatenate on channels, global-average-pool,
Linear(2C -> H, no bias) with H = C/8 as released (or a given `hidden` width), ReLU, Linear(-> 2, no bias),
softmax -> (a_H, a_L) per image and level;
F = a_H * P^H + a_L * P^L. One module (one set of weights) serves all five level positions.
"""
import torch
from torch import nn


class CrossFeatureFusion(nn.Module):
    def __init__(self, channels: int = 256, hidden: int = 0):
        """hidden: the gate's hidden width; 0 means C/8, the released code's (256 -> 32). A narrow model needs
        more: at C = 32, C/8 gives 4 ReLU units, which can all switch off and freeze the gate at 0.5/0.5."""
        super().__init__()
        hidden = hidden or channels // 8
        self.gate = nn.Sequential(nn.Linear(2 * channels, hidden, bias=False), nn.ReLU(),
                                  nn.Linear(hidden, 2, bias=False))  # released code: 512 -> 32 -> 2

    def weights(self, hr: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
        """Fusion weights (a_H, a_L) for one level: B x 2, each row summing to 1 (per image, not per batch)."""
        pooled = torch.cat([hr, lr], dim=1).mean(dim=(2, 3))  # B x 2C
        return self.gate(pooled).softmax(dim=1)  # B x 2

    def forward(self, hr_feats, lr_feats):
        fused = []
        for hr, lr in zip(hr_feats, lr_feats):
            a = self.weights(hr, lr)[:, :, None, None, None]  # B x 2 x 1 x 1 x 1
            fused.append(a[:, 0] * hr + a[:, 1] * lr)  # B x C x h x w
        return fused
