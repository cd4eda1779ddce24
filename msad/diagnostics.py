"""Diagnostics of distillation (MSAD Sec. 3.3-3.4): is the teacher worth distilling from, and does the KD term act?

* `CFFWeights`: the C-FF fusion weights (a_H, a_L) of a teacher (Sec. 3.3), averaged per level position
  over every image it sees, through a forward hook on the gate (nothing in the model changes).
* `StudentProbe`: at a few iterations of student training (Sec. 3.4), the mean |S_l - F_l| per level and
  the ratio ||dL_KD/dS_l|| / ||dL_det/dS_l|| of the gradients that reach the student's P2..P6, appended to
  log.jsonl. Gradients are taken with torch.autograd.grad on the pyramid, so no parameter gradient changes.
Both are averaged over processes (all-reduce), so 1 and N processes report the same numbers.
"""
import json

import torch

from . import dist
from .align import HR_LEVELS
from .checkpoint import append_line


class CFFWeights:
    """`with CFFWeights(teacher) as cff: ...run inference...; cff.summary()` -> {"a_H": [per level], "a_L": [...]}.

    The gate runs once per level position, in order, on each forward, so call k of a forward is level k.
    A model without C-FF gives an empty summary.
    """

    def __init__(self, model: torch.nn.Module):
        self.fusion = getattr(model, "fusion", None)
        self.levels = len(HR_LEVELS)  # five aligned pairs (HR P3..P7, LR P2..P6)
        self.sums, self.count, self._calls, self._handle = None, 0, 0, None

    def __enter__(self):
        if self.fusion is not None:
            self._handle = self.fusion.gate.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()
        return False

    def _hook(self, module, inputs, logits):  # logits: B x 2
        a = logits.detach().float().softmax(dim=1).sum(dim=0)  # 2: summed over the images of the batch
        if self.sums is None:
            self.sums = torch.zeros(self.levels, 2, device=a.device)
        level = self._calls % self.levels
        self.sums[level] += a
        self.count += logits.shape[0] if level == 0 else 0
        self._calls += 1

    def summary(self) -> dict:
        """Mean (a_H, a_L) per level position over all images of all processes (a collective under DDP)."""
        if self.fusion is None:
            return {}
        device = next(self.fusion.parameters()).device
        sums = self.sums if self.sums is not None else torch.zeros(self.levels, 2, device=device)
        total = dist.all_reduce_sum(torch.cat([sums.flatten(), sums.new_tensor([self.count])]))
        mean = (total[:-1].view(self.levels, 2) / total[-1].clamp_min(1)).cpu()
        return {"a_H": [round(v, 4) for v in mean[:, 0].tolist()], "a_L": [round(v, 4) for v in mean[:, 1].tolist()]}


def probe_iterations(iters: int, count: int = 5) -> set:
    """`count` iterations spread over [0, iters - 1], the first and the last included."""
    return {round(k * (iters - 1) / (count - 1)) for k in range(count)} if iters > 1 else {0}


class StudentProbe:
    """Called by distill.DistillationLoss at each training step; acts only at `iterations`."""

    def __init__(self, iterations, log_path=None):
        self.iterations, self.log_path = set(iterations), log_path
        self.records = {}  # iteration -> dict, for the final metrics line

    def __call__(self, iteration: int, losses: dict, feats, mapped, teacher_feats) -> None:
        """feats: the student's P2..P6 (gradients are taken there); mapped: the same after the adapters of a
        thinner student (`feats` itself otherwise), compared with the teacher's fused pyramid."""
        if iteration not in self.iterations or iteration in self.records:
            return
        kd = sum(v for k, v in losses.items() if k.startswith("loss_kd_"))
        det = sum(v for k, v in losses.items() if not k.startswith("loss_kd_"))
        g_det = torch.autograd.grad(det, feats, retain_graph=True, allow_unused=True)
        g_kd = torch.autograd.grad(kd, feats, retain_graph=True, allow_unused=True) if torch.is_tensor(kd) \
            and kd.requires_grad else [None] * len(feats)
        norm = lambda g: g.float().square().sum() if g is not None else feats[0].new_zeros((), dtype=torch.float)
        rows = [torch.stack([(s.detach().float() - t.float()).abs().mean(), norm(a), norm(b)])
                for s, t, a, b in zip(mapped, teacher_feats, g_kd, g_det)]  # per level: gap, |g_kd|^2, |g_det|^2
        values = dist.all_reduce_mean(torch.stack(rows)).cpu()  # L x 3; squared norms averaged over ranks
        record = {"iter": iteration, "diagnostics": "student_probe"}
        for i, (gap, kd_sq, det_sq) in enumerate(values.tolist()):
            record[f"feat_gap_p{i + 2}"] = round(gap, 6)
            record[f"grad_ratio_p{i + 2}"] = round((kd_sq / det_sq) ** 0.5 if det_sq > 0 else float("nan"), 6)
        kd_all, det_all = values[:, 1].sum().item(), values[:, 2].sum().item()  # over the whole pyramid
        record["grad_ratio_all"] = round((kd_all / det_all) ** 0.5 if det_all > 0 else float("nan"), 6)
        self.records[iteration] = record
        if self.log_path is not None and dist.is_main_process():
            append_line(self.log_path, json.dumps(record))

    def summary(self) -> dict:
        """Per-level mean |S - F| at the first and last probe, and the gradient ratios per probed iteration
        (per level and over the whole pyramid), for the final metrics line."""
        if not self.records:
            return {}
        its = sorted(self.records)
        pick = lambda r, name: [r[k] for k in sorted(r) if k.startswith(name)]
        return {"feat_gap_first": pick(self.records[its[0]], "feat_gap_"),
                "feat_gap_last": pick(self.records[its[-1]], "feat_gap_"),
                "grad_ratio": {str(i): pick(self.records[i], "grad_ratio_p") for i in its},
                "grad_ratio_all": {str(i): self.records[i]["grad_ratio_all"] for i in its}}
