"""The loss of the aligned multi-scale teacher (MSAD Sec. 3.2): L_T = L_HR + L_LR + 0.4 L_fused.

Each term is the FCOS loss of one branch (fcos_loss.fcos_losses). The pyramid shift (Sec. 3.1) gives the three
branches one HR-frame location grid, so the targets are assigned once and every branch is scored against them.
The fused branch's weight 0.4 is the released code's.
"""
from .fcos_loss import fcos_losses, fcos_targets

FUSED_WEIGHT = 0.4  # weight of the fused branch in L_T (released code)


class TeacherLoss:
    """callable(outputs, batch, iteration) -> {"hr_loss_cls", ..., "lr_loss_...", "fused_loss_..."}, scalars.

    outputs: {branch: models.BranchOutputs} of MultiScaleTeacher, branches hr, lr and (with C-FF) fused;
    batch: an ImageBatch, its targets in HR pixels. Every term of the fused branch is scaled by `fused_weight`.
    With a mask branch (`mask_code`, the teacher's masks.MaskCode) each branch also has its "loss_mask", on the
    same mask targets.
    """

    def __init__(self, fused_weight: float = FUSED_WEIGHT, mask_code=None):
        self.fused_weight, self.mask_code = fused_weight, mask_code

    def __call__(self, outputs: dict, batch, iteration: int = 0) -> dict:
        # computed once (box and mask targets), reused by every branch
        targets = fcos_targets(outputs["hr"].geometry, batch.targets, self.mask_code)
        losses = {}
        for branch, out in outputs.items():
            weight = self.fused_weight if branch == "fused" else 1.0
            losses |= {k: weight * v for k, v in fcos_losses(out.head, targets, f"{branch}_").items()}
        return losses
