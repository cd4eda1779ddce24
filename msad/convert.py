"""Public COCO checkpoints in: torchvision's FCOS, AdelaiDet's FCOS, the released MSAD teacher and student.

    python -m msad.convert torchvision fcos_resnet50_fpn_coco-99b0c9b7.pth weights/fcos_torchvision.pth
    python -m msad.convert adelaidet FCOS_R_50_1x.pth weights/fcos_adelaidet.pth
    python -m msad.convert msad teacher_R50_w1.0.pth weights/msad_teacher.pth [--width 1.0]

The output is a checkpoint of this project (kind fcos, teacher or student; args with the architecture, the
COCO category ids and names) that evaluate.py, train_teacher.py --init-from and train_student.py --teacher
take like their own. Every tensor is mapped key by key (`Entry`: our key, source key, transform); whatever the
source has no tensor for is new (named, with its value), and every source tensor is used or listed as dropped.
What the sources do differently is an option of the model, stored in the args (msad/models.py ModelConfig):

  torchvision  P6 from P5, no per-level Scale (new, 1.0), locations at (j*s, i*s), score sqrt(cls * ctr) > 0.2,
               91 logits indexed by category id (the 80 COCO rows are kept)
  adelaidet    detectron2's MSRA ResNet-50 (stride in the 1x1 conv, BGR input in 0..255 minus the mean),
               P6 from P5
  msad         detectron2 names, slimmable ResNet-50 (convs sliced to --width, one BN set per width), BGR input,
               C-FF as `SE`, no bias on bbox_pred / ctrness (new, 0)

BGR input minus the ImageNet mean, std 1, is what detectron2 feeds its MSRA weights; ours is RGB divided by
the std. The mean is the same colour, so folding the per-channel std into the first conv and reversing its
input channels gives the same first layer exactly (zero padding included).
"""
import argparse
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Callable

import torch
import torchvision

from .backbone import DEPTHS
from .checkpoint import load_refusal, save_atomic
from .cli import run_script
from .imagenet import IMAGENET_STD
from .models import ModelConfig, build_model

_TV_NAMES = torchvision.models.detection.FCOS_ResNet50_FPN_Weights.COCO_V1.meta["categories"]  # index = id
COCO_IDS = [i for i, n in enumerate(_TV_NAMES) if n not in ("__background__", "N/A")]  # the 80 used ids
COCO_NAMES = [_TV_NAMES[i] for i in COCO_IDS]
WIDTHS = (0.25, 0.5, 0.75, 1.0)  # the released slimmable ResNet-50 (one BN set each, in this order)
DROPPABLE = re.compile(r"num_batches_tracked$")  # BN step counters: no value at inference


def _same(source_shape, our_shape) -> bool:
    return tuple(source_shape) == tuple(our_shape)


def _sliced(n: int) -> Callable:
    """A slimmable tensor cut to its first entries in its first n dims: at least ours there, equal elsewhere."""
    return lambda s, o: len(s) == len(o) and all(a >= b for a, b in zip(s[:n], o[:n])) and _same(s[n:], o[n:])


def _single(source_shape, our_shape) -> bool:
    return math.prod(source_shape) == 1


@dataclass
class Entry:
    """One tensor of ours, the source tensor it comes from, and the map between them (both ways).
    fits(source shape, our shape) says whether `fn` can make ours from that source tensor: checked first."""
    ours: str
    source: str
    fn: Callable = lambda t: t  # source tensor -> ours
    inverse: Callable = lambda t: t  # ours -> source tensor (the round trip)
    note: str = ""
    fits: Callable = _same


def _rgb_std(t):  # a BGR-input conv (0..255 minus mean) -> our RGB input divided by the std
    return t.flip(1) * torch.tensor(IMAGENET_STD).mul(255).view(1, 3, 1, 1)


def _bgr_unit(t):  # the inverse of _rgb_std
    return (t / torch.tensor(IMAGENET_STD).mul(255).view(1, 3, 1, 1)).flip(1)


def _first(*sizes):
    """The first sizes[0] x sizes[1] x ... entries: a slimmable tensor at a width (its round trip gives the slice)."""
    return lambda t: t[tuple(slice(0, n) for n in sizes)]


def _scalar(t):
    return t.reshape(())


def _resnet_blocks(depth=50):
    """(stage 1..4, block index) of every residual block, in order."""
    return [(s, b) for s, n in enumerate(DEPTHS[depth][1], 1) for b in range(n)]


def _bn(ours, source, fn=lambda t: t, fits=_same):
    return [Entry(f"{ours}.{p}", f"{source}.{p}", fn, fits=fits)
            for p in ("weight", "bias", "running_mean", "running_var")]


def _head(source, names, scales: bool):
    """The FCOS head: {our module: theirs} for convs (weight and bias), and the per-level Scales ([1] -> [])."""
    e = [Entry(f"head.{ours}.{p}", f"{source}.{theirs}.{p}") for ours, theirs in names.items() for p in ("weight", "bias")]
    return e + [Entry(f"head.scales.{i}.scale", f"{source}.scales.{i}.scale", _scalar, lambda t: t.reshape(1),
                      fits=_single) for i in range(5) if scales]


def _towers(tower_names, num_convs=4):
    """{our tower.N: their tower.N} for the conv and the GroupNorm of each tower (the same indices in all three)."""
    return {f"{ours}.{3 * i + k}": f"{theirs}.{3 * i + k}" for ours, theirs in tower_names.items()
            for i in range(num_convs) for k in (0, 1)}


# ----------------------------------------------------------------------------------------------- the formats
def torchvision_entries():
    e = [Entry(f"fpn.{ours}.p{level}.{p}", f"backbone.fpn.{theirs}.{i}.0.{p}") for i, level in enumerate((3, 4, 5))
         for ours, theirs in (("lateral", "inner_blocks"), ("output", "layer_blocks")) for p in ("weight", "bias")]
    e += [Entry(f"fpn.{n}.{p}", f"backbone.fpn.extra_blocks.{n}.{p}") for n in ("p6", "p7") for p in ("weight", "bias")]
    names = _towers({"cls_tower": "classification_head.conv", "box_tower": "regression_head.conv"})
    e += _head("head", names | {"box_pred": "regression_head.bbox_reg", "ctr_pred": "regression_head.bbox_ctrness"},
               scales=False)
    rows = torch.tensor(COCO_IDS)  # 91 logits indexed by category id -> the 80 COCO classes
    return e + [Entry(f"head.cls_logits.{p}", f"head.classification_head.cls_logits.{p}", lambda t: t[rows],
                      note="the 80 rows of the COCO ids (of 91)", fits=_all_coco_ids) for p in ("weight", "bias")]


def _all_coco_ids(source_shape, our_shape) -> bool:
    """torchvision's logits: one row per id 0..90 (91), of which ours keep the 80 used ones."""
    return tuple(source_shape) == (len(_TV_NAMES), *our_shape[1:])


def _torchvision_resnet(model_state):
    """torchvision's ResNet keys are ours under backbone.body."""
    return [Entry(k, f"backbone.body.{k[len('backbone.'):]}") for k in model_state if k.startswith("backbone.")]


def _d2_resnet(prefix):
    """detectron2's MSRA ResNet-50 (AdelaiDet): stem.conv1 (+ .norm), res{2..5}.{b}.conv{1,2,3}, shortcut."""
    e = [Entry("backbone.conv1.weight", f"{prefix}.stem.conv1.weight", _rgb_std, _bgr_unit, "BGR -> RGB, std folded")]
    e += _bn("backbone.bn1", f"{prefix}.stem.conv1.norm")
    for s, b in _resnet_blocks():
        src, ours = f"{prefix}.res{s + 1}.{b}", f"backbone.layer{s}.{b}"
        for k in (1, 2, 3):
            e += [Entry(f"{ours}.conv{k}.weight", f"{src}.conv{k}.weight"), *_bn(f"{ours}.bn{k}", f"{src}.conv{k}.norm")]
        if b == 0:
            e += [Entry(f"{ours}.downsample.0.weight", f"{src}.shortcut.weight"),
                  *_bn(f"{ours}.downsample.1", f"{src}.shortcut.norm")]
    return e


def _slimmable_resnet(prefix, width):
    """The released slimmable ResNet-50: features.0 = (conv, BN sets, ReLU, pool); features.n = Block with body
    (conv 0, BN 1, conv 3, BN 4, conv 6, BN 7) and shortcut (conv 0, BN 1). Convs hold the full width and are
    cut to `width`; each BN holds one set per width (bn.0 .. bn.3 for 0.25 .. 1.0)."""
    w, base = WIDTHS.index(width), int(64 * width)
    e = [Entry("backbone.conv1.weight", f"{prefix}.features.0.0.weight", lambda t: _rgb_std(t[:base]), _bgr_unit,
               f"first {base} filters, BGR -> RGB, std folded", _sliced(1))]
    e += _bn("backbone.bn1", f"{prefix}.features.0.1.bn.{w}", _first(base), _sliced(1))
    inp = base
    for n, (s, b) in enumerate(_resnet_blocks(), 1):
        src, ours = f"{prefix}.features.{n}", f"backbone.layer{s}.{b}"
        mid = base * 2 ** (s - 1)
        for k, (conv, bn, out, i) in enumerate(((0, 1, mid, inp), (3, 4, mid, mid), (6, 7, 4 * mid, mid)), 1):
            e += [Entry(f"{ours}.conv{k}.weight", f"{src}.body.{conv}.weight", _first(out, i), fits=_sliced(2)),
                  *_bn(f"{ours}.bn{k}", f"{src}.body.{bn}.bn.{w}", _first(out), _sliced(1))]
        if b == 0:
            e += [Entry(f"{ours}.downsample.0.weight", f"{src}.shortcut.0.weight", _first(4 * mid, inp),
                        fits=_sliced(2)),
                  *_bn(f"{ours}.downsample.1", f"{src}.shortcut.1.bn.{w}", _first(4 * mid), _sliced(1))]
        inp = 4 * mid
    return e


def _d2_fpn(prefix, levels):
    e = [Entry(f"fpn.{part}.p{l}.{p}", f"{prefix}.fpn_{part}{l}.{p}") for l in levels if l <= 5
         for part in ("lateral", "output") for p in ("weight", "bias")]
    return e + [Entry(f"fpn.p{l}.{p}", f"{prefix}.top_block.p{l}.{p}") for l in (6, 7) if l in levels
                for p in ("weight", "bias")]


def adelaidet_entries():
    names = _towers({"cls_tower": "cls_tower", "box_tower": "bbox_tower"})
    names |= {"cls_logits": "cls_logits", "box_pred": "bbox_pred", "ctr_pred": "ctrness"}
    return (_d2_resnet("backbone.bottom_up") + _d2_fpn("backbone", range(3, 8))
            + _head("proposal_generator.fcos_head", names, scales=True))


def msad_entries(kind, width):
    """The released teacher (T_*, SE) or student (S_*) at `width`; bbox_pred and ctrness have no bias there."""
    side = "T" if kind == "teacher" else "S"
    e = _slimmable_resnet(f"{side}_backbone.bottom_up", width)
    e += _d2_fpn(f"{side}_backbone", range(2, 8) if kind == "teacher" else range(2, 7))
    e += _head(f"{side}_fcos_head", _towers({"cls_tower": "cls_tower", "box_tower": "bbox_tower"})
               | {"cls_logits": "cls_logits"}, scales=True)
    e += [Entry(f"head.{ours}.weight", f"{side}_fcos_head.{theirs}.weight")
          for ours, theirs in (("box_pred", "bbox_pred"), ("ctr_pred", "ctrness"))]
    return e + ([Entry(f"fusion.gate.{i}.weight", f"SE.fc.{i}.weight") for i in (0, 2)] if kind == "teacher" else [])


# ------------------------------------------------------------------------------------------- the conversion
FORMATS = {  # name -> (signature keys, model options); msad: teacher or student, found from the file
    "torchvision": (("backbone.body.conv1.weight", "head.classification_head.cls_logits.weight"),
                    dict(p6_from="p5", center_offset=False, decode_rule="torchvision", score_thresh=0.2)),
    "adelaidet": (("backbone.bottom_up.stem.conv1.weight", "proposal_generator.fcos_head.cls_logits.weight"),
                  dict(p6_from="p5", stride_in_1x1=True)),
    "msad": (("T_backbone.bottom_up.features.0.0.weight", "T_fcos_head.cls_logits.weight"), dict(p6_from="c5")),
}
# How each source pads an image before its backbone: torchvision's GeneralizedRCNNTransform to 32, detectron2
# (AdelaiDet) to its FPN's size_divisibility, the stride of its last input (res5) 32, the released MSAD to 256.
# Stored with the converted model (args "size_divisible") for evaluate.py: evaluation.canvas_multiple.
SOURCE_PADDING = {"torchvision": 32, "adelaidet": 32, "msad": 256}
EXPECTED_NEW = {  # tensors the source has no counterpart for, and the value they get
    "torchvision": (r"head\.scales\.\d\.scale", "1.0: torchvision's FCOS has no per-level Scale"),
    "msad": (r"head\.(box_pred|ctr_pred)\.bias", "0: the released bbox_pred and ctrness have no bias"),
}


def load_source(path) -> dict:
    """The source's tensors by name (a detectron2 file keeps them under "model"); one-line errors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except Exception as e:  # a pickle with code, numpy arrays (a detectron2 .pkl), garbage, a torn file
        raise ValueError(f"{path} is not a loadable torch checkpoint ({load_refusal(path, e)})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path} holds no state dict (a dict of tensors, or one under 'model')")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def infer_width(state) -> float | None:
    """The slimmable width a released MSAD file was trained at, from its FPN's input channels (256 x width)."""
    lateral = next((v for k, v in state.items() if re.fullmatch(r"[TS]_backbone\.fpn_lateral2\.weight", k)), None)
    return None if lateral is None or lateral.dim() != 4 else lateral.shape[1] / 256


def _msad_width(state, path, width: float | None) -> float:
    """The width of a released MSAD file (one of WIDTHS); --width, if given, must be it."""
    found = infer_width(state)
    if found is None:
        raise ValueError(f"{path} has no 4-d fpn_lateral2.weight (T_ or S_backbone), whose input channels give the "
                         f"width it was trained at")
    if width is not None and width != found:
        raise ValueError(f"--width {width}: {path} was trained at width {found} (its FPN reads "
                         f"{int(256 * found)} channels of res2)")
    if found not in WIDTHS:
        raise ValueError(f"{path}: width {found} is not one of the released {WIDTHS}")
    return found


def plan(fmt: str, state: dict, path, width: float | None):
    """(kind, ModelConfig, entries, the built model's state_dict) for a source file of format `fmt`; refuses a file
    of another format first."""
    signature, options = FORMATS[fmt]
    kind = "fcos"
    if fmt == "msad":  # a released student file holds S_ (and mostly its frozen teacher, T_)
        kind = "student" if "S_backbone.bottom_up.features.0.0.weight" in state else "teacher"
        signature = tuple(k.replace("T_", "S_", 1) for k in signature) if kind == "student" else signature
    missing = [k for k in signature if k not in state]
    if missing:
        raise ValueError(f"{path} is not a {fmt} checkpoint: it lacks {', '.join(missing)}; its first keys: "
                         f"{', '.join(list(state)[:4])}")
    if fmt == "msad":
        width = _msad_width(state, path, width)
    elif width not in (None, 1.0):
        raise ValueError(f"--width {width} is for the released slimmable MSAD files; a {fmt} file has no other width")
    cfg = ModelConfig(width=width or 1.0, num_classes=len(COCO_IDS), **options)
    model_state = build_model(kind, cfg).state_dict()
    return kind, cfg, entries_for(fmt, kind, cfg.width, model_state), model_state


def entries_for(fmt: str, kind: str, width: float, model_state: dict) -> list:
    if fmt == "torchvision":
        return _torchvision_resnet(model_state) + torchvision_entries()
    return adelaidet_entries() if fmt == "adelaidet" else msad_entries(kind, width)


def to_source(ckpt: dict) -> dict:
    """The inverse of `convert` (the round trip): a converted checkpoint's tensors under the source's names.
    A slimmable tensor comes back at the converted width, torchvision's logits as the 80 COCO rows."""
    fmt = ckpt["converted_from"]["format"]
    model = ckpt["model"]
    entries = entries_for(fmt, ckpt["kind"], ckpt["args"]["width"], model)
    return {e.source: e.inverse(model[e.ours]) for e in entries}


def convert(fmt: str, path, width: float | None = None) -> dict:
    """Convert a source file; returns our checkpoint dict plus a "report" (loaded / new / dropped keys)."""
    state = load_source(path)
    kind, cfg, entries, model_state = plan(fmt, state, path, width)
    absent = [e.source for e in entries if e.source not in state]
    if absent:
        unmatched = [k for k in state if k not in {e.source for e in entries}]
        raise ValueError(f"{path} does not match the {fmt} format: {len(absent)} expected keys are missing (first: "
                         f"{', '.join(absent[:3])}); first keys that matched nothing: {', '.join(unmatched[:3])}")
    converted = transform(entries, state, model_state, path)
    new = [k for k in model_state if k not in converted]
    pattern, why = EXPECTED_NEW.get(fmt, ("$^", ""))
    if any(not re.fullmatch(pattern, k) for k in new):
        raise ValueError(f"{path}: no source tensor for {', '.join(k for k in new if not re.fullmatch(pattern, k))}")
    used = {e.source for e in entries}
    dropped = [k for k in state if k not in used]
    unexplained = [k for k in dropped if not droppable(fmt, kind, k)]
    if unexplained:
        raise ValueError(f"{path}: {len(unexplained)} tensors this project's {kind} has no place for (first: "
                         f"{', '.join(unexplained[:3])}); the file is not a plain {fmt} FCOS")
    args = {**cfg.to_dict(), "preset": "coco", "test_size": 800, "max_size": 1333, "fusion": kind == "teacher",
            "cat_ids": COCO_IDS, "class_names": COCO_NAMES, "size_divisible": SOURCE_PADDING[fmt]}
    report = {"loaded": sorted(used), "new": {k: why for k in new}, "dropped": dropped,
              "notes": {e.ours: e.note for e in entries if e.note}}
    return {"kind": kind, "model": {k: converted.get(k, model_state[k]) for k in model_state}, "args": args,
            "iteration": 0, "converted_from": {"format": fmt, "file": os.path.basename(str(path)),
                                               "map": {e.ours: e.source for e in entries}}, "report": report}


def transform(entries, state: dict, model_state: dict, path) -> dict:
    """Our tensors from the source's: every shape checked before any transform, non-finite values refused."""
    wrong = [f"{e.source} {tuple(state[e.source].shape)} for {e.ours} {tuple(model_state[e.ours].shape)}"
             for e in entries if not e.fits(state[e.source].shape, model_state[e.ours].shape)]
    if wrong:
        raise ValueError(f"{path}: {len(wrong)} tensors of a shape this architecture cannot take (first: "
                         f"{'; '.join(wrong[:3])})")
    converted = {e.ours: e.fn(state[e.source]).to(model_state[e.ours].dtype).contiguous() for e in entries}
    bad = next((e for e in entries if converted[e.ours].is_floating_point() and
                not converted[e.ours].isfinite().all()), None)
    if bad is not None:
        count = int((~converted[bad.ours].isfinite()).sum())
        raise ValueError(f"{path}: {bad.source} holds {count} NaN or infinite values (for {bad.ours}); not converted")
    return converted


def droppable(fmt: str, kind: str, key: str) -> bool:
    """Source tensors with no use at inference here: BN step counters, the other widths' BN sets, and in a
    released student file its frozen teacher and the student's unused P7 conv."""
    if DROPPABLE.search(key):
        return True
    if fmt == "msad":
        return bool(re.search(r"\.bn\.\d\.", key)) or (kind == "student" and (
            key.startswith(("T_", "SE.")) or key.startswith("S_backbone.top_block.p7.")))
    return False


def _groups(keys) -> str:
    counts = {}
    for k in keys:
        counts[k.split(".")[0]] = counts.get(k.split(".")[0], 0) + 1
    return ", ".join(f"{n} {g}" for g, n in counts.items())


def check_output(src, out, overwrite: bool) -> None:
    """Before any work: OUT is never SRC (the same file, however named), and an existing OUT needs --overwrite."""
    if os.path.realpath(out) == os.path.realpath(src) or (
            os.path.exists(out) and os.path.exists(src) and os.path.samefile(out, src)):
        raise ValueError(f"OUT {out} is the source file {src}: converting would replace the download; "
                         f"give another OUT")
    if os.path.lexists(out) and not overwrite:
        raise FileExistsError(f"OUT {out} already exists; add --overwrite to replace it, or give another OUT")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=sorted(FORMATS), help="what SRC is")
    p.add_argument("src", help="the downloaded checkpoint")
    p.add_argument("out", help="this project's checkpoint to write (e.g. weights/fcos_torchvision.pth)")
    p.add_argument("--width", type=float, help="msad: the slimmable width (default: read from the file)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (never SRC itself)")
    args = p.parse_args(argv)
    check_output(args.src, args.out, args.overwrite)
    ckpt = convert(args.format, args.src, args.width)
    report = ckpt.pop("report")
    print(f"loaded: {len(report['loaded'])} source tensors into {_groups(ckpt['converted_from']['map'])}")
    for key, note in report["notes"].items():
        print(f"  {key}: {note}")
    reasons = {why: [k for k, w in report["new"].items() if w == why] for why in report["new"].values()}
    print(f"new: {len(report['new'])}" + "".join(f"; {', '.join(keys)} = {why}" for why, keys in reasons.items()))
    dropped = report["dropped"]
    print(f"dropped: {len(dropped)}" + (f" ({', '.join(dropped[:4])}{', ...' if len(dropped) > 4 else ''})"
                                         if dropped else ""))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_atomic(ckpt, args.out)
    result = {"output": args.out, "kind": ckpt["kind"], "format": args.format, "width": ckpt["args"]["width"],
              "loaded": len(report["loaded"]), "new": len(report["new"]), "dropped": len(dropped)}
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    run_script(main)
