"""torchvision's fcos_resnet50_fpn with seeded random weights that detects something: the converted-weights tests'
detector, also measured by benchmarks/resize_gap.py."""
import torch
import torchvision

from msad import convert


def seeded_torchvision():
    """Seeded random weights, BN statistics too. The 11 logits of ids COCO does not use get a very low bias: in the
    released weights they were only ever trained as negatives, and the conversion keeps the 80 used ones."""
    torch.manual_seed(0)
    tv = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None).eval()
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
        bias = tv.head.classification_head.cls_logits.bias
        bias.fill_(-50.0)
        bias[convert.COCO_IDS] = -1.0  # raised from the prior (-4.6): sqrt(cls * ctr) passes 0.2 often
        tv.head.regression_head.bbox_ctrness.bias.fill_(1.0)
    return tv
