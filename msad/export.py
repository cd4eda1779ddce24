"""Deployment: a checkpoint's detector as a `torch.export` program, normalisation, decoding and NMS included.

    python -m msad.export --checkpoint runs/student/model_final.pth --output runs/student/student.pt2
    python -m msad.export --checkpoint runs/teacher/model_final.pth --branch lr --output teacher_lr.pt2
    python evaluate.py --checkpoint runs/student/student.pt2          # the same data, metrics and pictures

The program takes one uint8 RGB image [3, H, W], H and W multiples of 128 (the canvas the data loader pads
to, MSAD Sec. 3.1) of at least 256, with the image top-left in it, and `size`, its (h, w) inside the canvas
(an int64 tensor [2]). It normalises the image, runs the detector at its own resolution (the student and the
teacher's LR branch halve the canvas themselves), decodes and runs class-wise NMS (msad/decode.py), and
returns boxes [n, 4] (x0, y0, x1, y1 in the canvas' pixels, clipped to `size`), scores [n] and labels [n]
(contiguous; the category ids and names are in the file's metadata). H and W are dynamic. Nothing but torch
and torchvision (for the NMS kernel) is needed to run it:

    program = torch.export.load("student.pt2").module()
    boxes, scores, labels = program(image, torch.tensor([h, w]))
"""
import argparse
import json
import os
import sys

import torch
from torch import nn
from torch.export.passes import move_to_device_pass

from .align import HR_PAD
from .checkpoint import load_checkpoint, write_atomic
from .cli import run_script
from .decode import decode_image, rescale
from .imagenet import normalize
from .models import checkpoint_categories, model_from_checkpoint

METADATA = "msad.json"  # extra file inside the .pt2: kind, branch, the checkpoint's args
MIN_SIDE = 2 * HR_PAD  # exporting specialises the smallest level's size to >= 2 (a size-1 map is a guard)
MAX_SIDE = 64 * HR_PAD


class Deployable(nn.Module):
    """The inference path of a detector on one padded image, as one traceable function (see the module doc)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model.eval()
        self.options = model.decode_options()

    def forward(self, image: torch.Tensor, size: torch.Tensor):
        feats = self.model.features(normalize(image[None]))  # [1 x C x h_i x w_i] per level
        points, strides, _, shapes = self.model.geometry(feats)
        cls, box, ctr = self.model.head(feats)  # 1 x L x K, 1 x L x 4, 1 x L
        return decode_image(cls[0], box[0], ctr[0], points, strides, shapes, size, **self.options)


def check_canvas(height: int, width: int) -> None:
    if height % HR_PAD or width % HR_PAD or min(height, width) < MIN_SIDE or max(height, width) > MAX_SIDE:
        raise ValueError(f"image size {height}x{width}: an exported program takes a canvas whose sides are "
                         f"multiples of {HR_PAD}, from {MIN_SIDE} to {MAX_SIDE} px")


def _nms_fake(dets, scores, iou_threshold):
    """torchvision 0.29's fake NMS says it keeps >= 2 boxes (the deprecated create_unbacked_symint's default
    minimum), which puts `assert kept >= 2` into every exported graph: one box, or none, would fail at run
    time. This one allows 0. It only shapes the trace; the program calls torchvision's own NMS kernel."""
    torch._check(dets.dim() == 2 and dets.size(1) == 4 and scores.dim() == 1 and dets.size(0) == scores.size(0))
    return dets.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.long)


def export(model: nn.Module, example_size=(MIN_SIDE, MIN_SIDE + HR_PAD)) -> torch.export.ExportedProgram:
    """The torch.export program of `model`'s inference (its selected branch), dynamic in height and width."""
    check_canvas(*example_size)
    torch.library.register_fake("torchvision::nms", _nms_fake)  # replaces torchvision's (see above)
    image = torch.randint(0, 256, (3, *example_size), dtype=torch.uint8)
    size = torch.tensor(example_size)
    dims = {k: torch.export.Dim(k, min=MIN_SIDE // HR_PAD, max=MAX_SIDE // HR_PAD) for k in ("h", "w")}
    shapes = {"image": {1: HR_PAD * dims["h"], 2: HR_PAD * dims["w"]}, "size": None}
    with torch.no_grad():
        return torch.export.export(Deployable(model.cpu()), (image, size), dynamic_shapes=shapes, strict=False)


def save(program, path, ckpt: dict, branch: str | None) -> None:
    meta = {"kind": ckpt["kind"], "branch": branch, "args": ckpt["args"], "torch": torch.__version__}
    write_atomic(path, lambda f: torch.export.save(program, f, extra_files={METADATA: json.dumps(meta)}))


class ExportedDetector(nn.Module):
    """A loaded program behind the interface of our models: ImageBatch -> detections in original pixels.

    Every image runs alone on its batch's canvas (evaluation batches hold images of one canvas size), so its
    detections are those of the checkpoint it came from (tests/test_export.py).
    """

    def __init__(self, path: str):
        super().__init__()
        extra = {METADATA: ""}
        try:
            program = torch.export.load(path, extra_files=extra)
        except Exception as e:  # not a .pt2, torn, another torch's format
            raise ValueError(f"{path} is not a loadable torch.export program ({type(e).__name__}: "
                             f"{(str(e).strip().splitlines() or [''])[0]})") from None
        if not extra[METADATA]:
            raise ValueError(f"{path} is a torch.export program without msad's metadata; export it with "
                             f"python -m msad.export")
        self.meta, self.path, self.exported = json.loads(extra[METADATA]), path, program
        self.program = program.module()
        self.branch = self.meta["branch"] or ("lr" if self.meta["kind"] == "student" else "hr")

    def to_device(self, device: torch.device, branch: str | None = None) -> "ExportedDetector":
        """On `device` (the program's constants too); `branch`, if given, must be the exported one."""
        if branch is not None and branch != self.branch:
            raise ValueError(f"--branch {branch}: {self.path} holds the {self.branch} branch only (export "
                             f"another one with python -m msad.export --branch {branch})")
        if torch.device(device).type != "cpu":
            self.program = move_to_device_pass(self.exported, torch.device(device)).module()
        return self

    def train(self, mode: bool = True) -> "ExportedDetector":
        """A program has no train mode (it was exported in eval mode); model.eval() is a no-op."""
        return self

    def forward(self, batch):
        check_canvas(*batch.images.shape[-2:])
        results = []
        for image, (h, w), orig in zip(batch.images, batch.image_sizes, batch.orig_sizes):
            boxes, scores, labels = self.program(image, torch.tensor([h, w], device=image.device))
            results.append({"boxes": rescale(boxes, (h, w), orig), "scores": scores, "labels": labels})
        return results


def load_exported(path: str) -> tuple[ExportedDetector, dict]:
    """The detector of a .pt2 (on CPU; see to_device) and a checkpoint-like dict (kind, args) for evaluate.py."""
    detector = ExportedDetector(path)
    return detector, {"kind": detector.meta["kind"], "args": detector.meta["args"]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a model_final.pth (fcos, teacher or student)")
    p.add_argument("--output", required=True, help="the .pt2 file to write")
    p.add_argument("--branch", choices=("fused", "hr", "lr"), help="a teacher's branch (required for a teacher)")
    p.add_argument("--size", type=int, nargs=2, default=(MIN_SIDE, MIN_SIDE + HR_PAD), metavar=("H", "W"),
                   help="canvas of the example input that is traced (default: %(default)s)")
    args = p.parse_args(argv)
    check_canvas(*args.size)
    ckpt = load_checkpoint(args.checkpoint)
    if ckpt["kind"] == "teacher" and args.branch is None:
        raise ValueError(f"{args.checkpoint} is a teacher: say which branch to export with --branch fused|hr|lr "
                         f"(fused needs the HR canvas, lr is the aligned LR branch)")
    model = model_from_checkpoint(ckpt, args.checkpoint, args.branch)
    program = export(model, tuple(args.size))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save(program, args.output, ckpt, getattr(model, "branch", None))
    ids, _ = checkpoint_categories(ckpt)
    result = {"output": args.output, "kind": ckpt["kind"], "branch": getattr(model, "branch", None),
              "classes": len(ids), "bytes": os.path.getsize(args.output)}
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    run_script(main)
