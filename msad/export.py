"""Deployment: a checkpoint's detector as a `torch.export` program, normalisation, decoding and NMS included.

    python -m msad.export --checkpoint runs/student/model_final.pth --output runs/student/student.pt2
    python -m msad.export --checkpoint runs/teacher/model_final.pth --branch lr --output teacher_lr.pt2
    python evaluate.py --checkpoint runs/student/student.pt2          # the same data, metrics and pictures
    python -m msad.export --checkpoint runs/student/model_final.pth --output runs/student/student.onnx

The program takes one uint8 RGB image [3, H, W], H and W multiples of 128 (the canvas the data loader pads
to, MSAD Sec. 3.1) of at least 256, with the image top-left in it, and `size`, its (h, w) inside the canvas
(an int64 tensor [2]). It normalises the image, runs the detector at its own resolution (the student and the
teacher's LR branch halve the canvas themselves), decodes and runs class-wise NMS (msad/decode.py), and
returns boxes [n, 4] (x0, y0, x1, y1 in the canvas' pixels, clipped to `size`), scores [n] and labels [n]
(contiguous; the category ids and names are in the file's metadata), and for a model with a mask branch masks
[n, 28, 28], each detection's mask probabilities inside its box (msad.meinst.paste_masks puts them in the image).
H and W are dynamic. Nothing but torch and torchvision (for the NMS kernel) is needed to run it:

    program = torch.export.load("student.pt2").module()
    boxes, scores, labels = program(image, torch.tensor([h, w]))      # a mask model: boxes, scores, labels, masks

An `.onnx` output (or --format onnx) is the same program for ONNX Runtime (msad/onnx_export.py).

`--input low` (a student, or a teacher's LR branch): the program takes the half-size canvas itself (sides multiples
of 64, from 128), as a camera frame resized once to the low resolution, and the model reads it directly instead of
halving a full-resolution canvas; `size` and the boxes are in that canvas' pixels. Fed the nearest-halved canvas,
it gives the full-input program's detections at half their coordinates (tests/test_export.py).
"""
import argparse
import contextlib
import json
import logging
import os

import torch
from torch import nn
from torch.export.passes import move_to_device_pass

from . import align
from .align import HR_PAD
from .imagenet import normalize
from .checkpoint import load_checkpoint, write_atomic
from .cli import run_script
from .data import PAD_VALUE
from .decode import Detector, decode_head, rescale
from .models import ModelConfig, checkpoint_categories, default_branch, model_from_checkpoint

METADATA = "msad.json"  # extra file inside the .pt2, metadata key of the .onnx: kind, branch, args
MIN_SIDE = 2 * HR_PAD  # exporting specialises the smallest level's size to >= 2 (a size-1 map is a guard)
MAX_SIDE = 64 * HR_PAD
INPUTS = {"full": 1, "low": 2}  # --input -> how much smaller than the HR canvas the program's canvas is


class Deployable(nn.Module):
    """The inference path of a detector on one padded image, as one traceable function (see the module doc).
    low_input: the canvas is the half-size one, read directly by an LR model (P2..P6, no halving)."""

    def __init__(self, detector: Detector, low_input: bool = False):
        super().__init__()
        self.detector, self.low_input = detector.eval(), low_input

    def forward(self, image: torch.Tensor, size: torch.Tensor):
        model, branch = self.detector.model, self.detector.branch
        code = getattr(model, "mask_code", None)
        if not self.low_input:
            out = model(image[None], (branch,))[branch]  # head: 1 x L x K, 1 x L x 4, 1 x L (, 1 x L x D)
            return decode_head(out.head.image(0), out.geometry, size, code, **self.detector.options)
        feats = model.pyramid(normalize(image[None]), align.branch_levels(0.5))  # P2..P6 of the half-size canvas
        out = model.outputs({branch: feats})[branch]  # its grid in the HR frame, twice the canvas' pixels
        boxes, *rest = decode_head(out.head.image(0), out.geometry, size * 2, code, **self.detector.options)
        return boxes / 2, *rest  # masks are box-relative: unchanged


def check_canvas(height: int, width: int, min_side: int = MIN_SIDE, scale: int = 1) -> None:
    """A canvas the program takes: sides multiples of 128 / scale, from min_side / scale to MAX_SIDE / scale."""
    multiple, low, high = HR_PAD // scale, min_side // scale, MAX_SIDE // scale
    if height % multiple or width % multiple or min(height, width) < low or max(height, width) > high:
        raise ValueError(f"image size {height}x{width}: an exported program takes a canvas whose sides are "
                         f"multiples of {multiple}, from {low} to {high} px")


def _nms_fake(dets, scores, iou_threshold):
    """torchvision 0.29's fake NMS says it keeps >= 2 boxes (the deprecated create_unbacked_symint's default
    minimum), which puts `assert kept >= 2` into every exported graph: one box, or none, would fail at run
    time. This one allows 0. It only shapes the trace; the program calls torchvision's own NMS kernel."""
    torch._check(dets.dim() == 2 and dets.size(1) == 4 and scores.dim() == 1 and dets.size(0) == scores.size(0))
    return dets.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.long)


def export(detector: Detector, example_size=(MIN_SIDE, MIN_SIDE + HR_PAD), input: str = "full") -> torch.export.ExportedProgram:
    """The torch.export program of a detector's inference (its branch), dynamic in height and width; example_size
    is the HR canvas traced (halved for input "low")."""
    check_canvas(*example_size)
    scale = INPUTS[input]
    if scale > 1 and detector.branch != "lr":
        raise ValueError(f"--input {input}: only a student or a teacher's LR branch reads the half-size image "
                         f"(this is the {detector.branch} branch)")
    torch.library.register_fake("torchvision::nms", _nms_fake)  # replaces torchvision's (see above)
    example_size = tuple(s // scale for s in example_size)
    image = torch.randint(0, 256, (3, *example_size), dtype=torch.uint8)
    size = torch.tensor(example_size)
    pad = HR_PAD // scale
    dims = {k: torch.export.Dim(k, min=MIN_SIDE // HR_PAD, max=MAX_SIDE // HR_PAD) for k in ("h", "w")}
    shapes = {"image": {1: pad * dims["h"], 2: pad * dims["w"]}, "size": None}
    with torch.no_grad():
        return torch.export.export(Deployable(detector.cpu(), scale > 1), (image, size), dynamic_shapes=shapes,
                                   strict=False)


def metadata(ckpt: dict, branch: str | None, input: str = "full") -> dict:
    """msad's metadata of an exported file: kind, branch, input (full or low), the checkpoint's args, the torch."""
    return {"kind": ckpt["kind"], "branch": branch, "input": input, "args": ckpt["args"], "torch": torch.__version__}


def save(program, path, ckpt: dict, branch: str | None, input: str = "full") -> None:
    meta = json.dumps(metadata(ckpt, branch, input))
    write_atomic(path, lambda f: torch.export.save(program, f, extra_files={METADATA: meta}))


class ProgramDetector(nn.Module):
    """A deployed program behind the interface of our models: ImageBatch -> detections in original pixels.

    Every image runs alone on its batch's canvas (evaluation batches hold images of one canvas size), so its
    detections are those of the checkpoint it came from (tests/test_export.py, tests/test_onnx.py). A canvas
    under MIN_SIDE (a model evaluated at --test-size 128) is padded to it first, as the data loader pads.
    Subclasses: ExportedDetector (.pt2) here, onnx_export.OnnxDetector (.onnx).
    """

    def __init__(self, path: str, meta: dict):
        super().__init__()
        self.path, self.meta = path, meta
        self.branch = meta["branch"] or default_branch(meta["kind"], ModelConfig.from_dict(meta["args"]))
        self.scale = INPUTS[meta.get("input", "full")]  # 2: it takes the half-size canvas
        self.masks = meta["args"].get("mask_head") == "meinst"  # its fourth output: masks [n, 28, 28]

    def to_device(self, device: torch.device, branch: str | None = None) -> "ProgramDetector":
        """On `device`; `branch`, if given, must be the exported one."""
        if branch is not None and branch != self.branch:
            hint = f"export it from the teacher's checkpoint with python -m msad.export --branch {branch}" \
                if self.meta["kind"] == "teacher" else f"a {self.meta['kind']} has no other branch"
            raise ValueError(f"--branch {branch}: {self.path} holds the {self.branch} branch only ({hint})")
        return self

    def train(self, mode: bool = True) -> "ProgramDetector":
        """A program has no train mode (it was exported in eval mode); model.eval() is a no-op."""
        return self

    def run(self, image: torch.Tensor, size: torch.Tensor):
        """boxes, scores, labels (and masks) of one canvas [3, H, W] (uint8) whose image is `size` (h, w)."""
        raise NotImplementedError

    def forward(self, batch):
        check_canvas(*batch.images.shape[-2:], min_side=HR_PAD, scale=self.scale)
        results = []
        for image, (h, w), orig in zip(batch.images, batch.image_sizes, batch.orig_sizes):
            canvas = pad_canvas(image, MIN_SIDE // self.scale)
            boxes, scores, labels, *masks = self.run(canvas, torch.tensor([h, w], device=image.device))
            results.append({"boxes": rescale(boxes, (h, w), orig), "scores": scores, "labels": labels}
                           | ({"masks": masks[0]} if masks else {}))
        return results


def pad_canvas(image: torch.Tensor, min_side: int = MIN_SIDE) -> torch.Tensor:
    """A canvas [3, H, W] with each side at least min_side, padded bottom and right with PAD_VALUE."""
    h, w = image.shape[-2:]
    if min(h, w) >= min_side:
        return image
    canvas = torch.tensor(PAD_VALUE, dtype=image.dtype, device=image.device)[:, None, None]
    canvas = canvas.repeat(1, max(h, min_side), max(w, min_side))
    canvas[:, :h, :w] = image
    return canvas


def read_metadata(text: str | None, path: str, what: str = "a torch.export program") -> dict:
    """msad's metadata of a program file (kind, branch, the checkpoint's args), checked."""
    if not text:
        raise ValueError(f"{path} is {what} without msad's metadata; export it with python -m msad.export")
    try:
        meta = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{path}: its {METADATA} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not {"kind", "branch", "args"} <= meta.keys():
        raise ValueError(f"{path}: its {METADATA} lacks kind, branch or args; export it again with "
                         f"python -m msad.export")
    return meta


@contextlib.contextmanager
def _quiet_torch_export():
    """torch.export.load logs the whole traceback of a torn file before raising; our one line says it all."""
    logger = logging.getLogger("torch.export")
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled


class ExportedDetector(ProgramDetector):
    """A .pt2 program of python -m msad.export (see ProgramDetector)."""

    def __init__(self, path: str):
        extra = {METADATA: ""}
        try:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no such file: {path}")
            with _quiet_torch_export():
                program = torch.export.load(path, extra_files=extra)
        except Exception as e:  # not a .pt2, torn, another torch's format
            raise ValueError(f"{path} is not a loadable torch.export program ({type(e).__name__}: "
                             f"{(str(e).strip().splitlines() or [''])[0]})") from None
        super().__init__(path, read_metadata(extra[METADATA], path))
        self.exported, self.program = program, program.module()

    def to_device(self, device: torch.device, branch: str | None = None) -> "ExportedDetector":
        """On `device` (the program's constants too); `branch`, if given, must be the exported one."""
        super().to_device(device, branch)
        if torch.device(device).type != "cpu":
            self.program = move_to_device_pass(self.exported, torch.device(device)).module()
        return self

    def run(self, image, size):
        return self.program(image, size)


def load_exported(path: str) -> tuple[ProgramDetector, dict]:
    """The detector of a .pt2 or .onnx file (on CPU; see to_device) and a checkpoint-like dict (kind, args)."""
    if str(path).endswith(".onnx"):
        from .onnx_export import OnnxDetector
        detector = OnnxDetector(path)
    else:
        detector = ExportedDetector(path)
    return detector, {"kind": detector.meta["kind"], "args": detector.meta["args"]}


def output_format(output: str, fmt: str | None) -> str:
    """pt2 or onnx: --format, else the suffix of --output; a known suffix must agree with --format."""
    suffix = {".pt2": "pt2", ".onnx": "onnx"}.get(os.path.splitext(output)[1])
    if fmt and suffix and fmt != suffix:
        raise ValueError(f"--format {fmt} with --output {output}: name the file .{fmt} (evaluate.py reads the "
                         f"format from the suffix)")
    return fmt or suffix or "pt2"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a model_final.pth (fcos, teacher or student)")
    p.add_argument("--output", required=True, help="the .pt2 or .onnx file to write")
    p.add_argument("--format", choices=("pt2", "onnx"), help="default: the suffix of --output (else pt2)")
    p.add_argument("--branch", choices=("fused", "hr", "lr"), help="a teacher's branch (required for a teacher)")
    p.add_argument("--input", choices=tuple(INPUTS), default="full",
                   help="full: the program takes the HR canvas (a student halves it, as in training); low: a student "
                        "or LR branch takes the half-size canvas itself (sides multiples of 64)")
    p.add_argument("--size", type=int, nargs=2, default=(MIN_SIDE, MIN_SIDE + HR_PAD), metavar=("H", "W"),
                   help="canvas of the example input that is traced (default: %(default)s)")
    args = p.parse_args(argv)
    check_canvas(*args.size)
    fmt = output_format(args.output, args.format)
    if fmt == "onnx":
        from . import onnx_export
        onnx_export.require("--format onnx")  # before the minutes of tracing
    ckpt = load_checkpoint(args.checkpoint)
    if ckpt["kind"] == "teacher" and args.branch is None:
        raise ValueError(f"{args.checkpoint} is a teacher: say which branch to export with --branch fused|hr|lr "
                         f"(fused needs the HR canvas, lr is the aligned LR branch)")
    detector = Detector(*model_from_checkpoint(ckpt, args.checkpoint, args.branch))
    program = export(detector, tuple(args.size), args.input)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    if fmt == "onnx":
        onnx_export.save_onnx(onnx_export.to_onnx(program, masks=detector.masks), args.output,
                              metadata(ckpt, detector.branch, args.input), checkpoint_categories(ckpt))
    else:
        save(program, args.output, ckpt, detector.branch, args.input)
    ids, _ = checkpoint_categories(ckpt)
    result = {"output": args.output, "format": fmt, "kind": ckpt["kind"], "branch": detector.branch, "input": args.input,
              "classes": len(ids), "bytes": os.path.getsize(args.output)}
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    run_script(main)
