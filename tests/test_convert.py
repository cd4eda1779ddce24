"""Public weights in (python -m msad.convert): torchvision's FCOS converts exactly (the same detections), and
AdelaiDet's and the released MSAD files, built here with their documented names and shapes, map tensor by
tensor and back."""
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

import evaluate
from msad import convert
from msad.backbone import ResNetTrunk
from msad.data import collate
from msad.imagenet import normalize
from msad.decode import Detector
from msad.models import model_from_checkpoint
from scripts_common import run

sys.path.insert(0, str(Path(__file__).parent / "helpers"))
from seeded_torchvision import seeded_torchvision  # noqa: E402

SIZES = [(256, 384), (384, 256), (256, 512)]  # multiples of 128: neither model resizes or pads


pytestmark = pytest.mark.usefixtures("two_threads")


@pytest.fixture(scope="module")
def torchvision_fcos(tmp_path_factory):
    """fcos_resnet50_fpn with seeded random weights that detects something (seeded_torchvision), and its file."""
    tv = seeded_torchvision()
    path = tmp_path_factory.mktemp("tv") / "fcos_tv.pth"
    torch.save(tv.state_dict(), path)
    return tv, path


def torchvision_detect(tv, image):
    h, w = image.shape[-2:]
    tv.transform.min_size, tv.transform.max_size = (min(h, w),), max(h, w)  # no resize: the image's own size
    with torch.no_grad():
        return tv([image.float() / 255])[0]


def assert_same(ours_boxes, ours_scores, ours_cat_ids, theirs, box_atol=1e-4):
    """Equal detections: each of ours matches one of theirs (the same category, the score within 1e-4, the
    nearest box) whose box is within box_atol (plus float32 rounding, 1e-6 of the coordinate); one to one."""
    assert len(ours_scores) == len(theirs["scores"]) > 10
    matched = set()
    for box, score, cat in zip(ours_boxes, ours_scores, ours_cat_ids):
        box = torch.as_tensor(box, dtype=torch.float32)
        cand = ((theirs["labels"] == cat) & ((theirs["scores"] - float(score)).abs() <= 1e-4)).nonzero().squeeze(1)
        assert len(cand), (box, score, cat)
        j = int(cand[(theirs["boxes"][cand] - box).abs().amax(1).argmin()])
        assert torch.allclose(box, theirs["boxes"][j], atol=box_atol, rtol=1e-6) and j not in matched
        matched.add(j)


def test_converted_torchvision_fcos_gives_torchvisions_detections(torchvision_fcos):
    tv, path = torchvision_fcos
    ckpt = convert.convert("torchvision", path)
    assert ckpt["kind"] == "fcos" and ckpt["args"]["cat_ids"] == convert.COCO_IDS and len(ckpt["args"]["class_names"]) == 80
    assert set(ckpt["report"]["new"]) == {f"head.scales.{i}.scale" for i in range(5)}
    assert all(k.endswith("num_batches_tracked") for k in ckpt["report"]["dropped"])
    model = Detector(*model_from_checkpoint(ckpt, str(path))).eval()
    g = torch.Generator().manual_seed(1)
    for h, w in SIZES:
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        target = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "image_id": 0,
                  "orig_size": (h, w), "size": (h, w)}
        with torch.no_grad():
            ours = model(collate([(image, target)]))[0]
        cat_ids = torch.tensor(convert.COCO_IDS)[ours["labels"]]  # torchvision's labels are category ids
        assert_same(ours["boxes"], ours["scores"], cat_ids, torchvision_detect(tv, image))


def test_evaluate_images_on_the_converted_file_gives_torchvisions_detections(torchvision_fcos, tmp_path):
    tv, path = torchvision_fcos
    out = tmp_path / "fcos_converted.pth"
    assert convert.main(["torchvision", str(path), str(out)])["kind"] == "fcos"
    folder, g, images = tmp_path / "photos", torch.Generator().manual_seed(2), {}
    folder.mkdir()
    for i, (h, w) in enumerate(SIZES):
        images[f"{i}.png"] = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        Image.fromarray(images[f"{i}.png"].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    evaluate.main(["--checkpoint", str(out), "--images", str(folder), "--test-size", "256", "--max-size", "512",
                   "--output-dir", str(tmp_path / "eval"), "--workers", "0", "--device", "cpu"])
    entries = json.loads((tmp_path / "eval" / "detections.json").read_text())
    assert [e["file_name"] for e in entries] == sorted(images)
    for e in entries:
        theirs = torchvision_detect(tv, images[e["file_name"]])
        names = [convert.COCO_NAMES[convert.COCO_IDS.index(c)] for c in e["category_ids"]]
        assert names == e["category_names"]
        assert_same(e["boxes"], e["scores"], e["category_ids"], theirs, box_atol=0.006)  # rounded to 0.01 px


@pytest.fixture(scope="module")
def any_canvas(torchvision_fcos, tmp_path_factory):
    """evaluate.py --images with the converted file on 800x1066, 800x800 and 800x1200 images at its test size 800:
    not resized, only padded (torchvision to 800x1088, 800x800, 800x1216); and torchvision's own detections."""
    tv, path = torchvision_fcos
    tmp = tmp_path_factory.mktemp("any_canvas")
    convert.main(["torchvision", str(path), str(tmp / "fcos.pth")])
    folder, g, theirs = tmp / "photos", torch.Generator().manual_seed(4), {}
    folder.mkdir()
    for h, w in ((800, 1066), (800, 800), (800, 1200)):
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{h}x{w}.png")
        theirs[f"{h}x{w}.png"] = torchvision_detect(tv, image)
    evaluate.main(["--checkpoint", str(tmp / "fcos.pth"), "--images", str(folder), "--output-dir", str(tmp / "eval"),
                   "--workers", "0", "--device", "cpu"])
    entries = json.loads((tmp / "eval" / "detections.json").read_text())
    return torch.load(tmp / "fcos.pth", weights_only=True), entries, theirs


def test_a_converted_file_pads_as_its_source_so_its_features_are_torchvisions_on_any_canvas(any_canvas):
    """Padded to 128 (as before), none of the 300 detections had torchvision's score: the padding changes every
    feature near the border. Padded to 32, as torchvision pads (stored with the converted file), each has."""
    ckpt, entries, theirs = any_canvas
    assert ckpt["args"]["size_divisible"] == 32 and len(entries) == 3
    for e in entries:
        mine = sorted(zip(e["category_ids"], e["scores"]))
        ref = sorted(zip(theirs[e["file_name"]]["labels"].tolist(), theirs[e["file_name"]]["scores"].tolist()))
        assert len(mine) == len(ref) > 10
        assert all(c == rc and abs(s - rs) <= 1e-4 for (c, s), (rc, rs) in zip(mine, ref))


def test_the_converted_file_gives_torchvisions_detections_on_any_canvas(any_canvas):
    """Its boxes too: torchvision puts P6/P7 locations at canvas // grid (61 and 114 px steps on an 800 px side),
    not at 64 and 128, and the converted model places them so (with the 128 steps, 247 of 300 were equal)."""
    _, entries, theirs = any_canvas
    for e in entries:
        # detections.json rounds to 0.01 px, and torchvision's decoding (anchor centre and size) rounds otherwise
        # in float32: within 0.01 px
        assert_same(e["boxes"], e["scores"], e["category_ids"], theirs[e["file_name"]], box_atol=0.01)


# ------------------------------------------------------------------ AdelaiDet and the released MSAD files
def _bn(state, prefix, c, g, counter=False):
    state |= {f"{prefix}.weight": torch.rand(c, generator=g) + 0.5, f"{prefix}.bias": torch.randn(c, generator=g),
              f"{prefix}.running_mean": torch.randn(c, generator=g), f"{prefix}.running_var": torch.rand(c, generator=g) + 0.5}
    if counter:
        state[f"{prefix}.num_batches_tracked"] = torch.tensor(90000)


def _head(state, prefix, g, box_bias=True, classes=80):
    for tower in ("cls_tower", "bbox_tower"):
        for i in range(4):  # conv, GroupNorm, ReLU
            state[f"{prefix}.{tower}.{3 * i}.weight"] = torch.randn(256, 256, 3, 3, generator=g) * 0.01
            state[f"{prefix}.{tower}.{3 * i}.bias"] = torch.randn(256, generator=g)
            state[f"{prefix}.{tower}.{3 * i + 1}.weight"] = torch.rand(256, generator=g)
            state[f"{prefix}.{tower}.{3 * i + 1}.bias"] = torch.randn(256, generator=g)
    for name, out, bias in (("cls_logits", classes, True), ("bbox_pred", 4, box_bias), ("ctrness", 1, box_bias)):
        state[f"{prefix}.{name}.weight"] = torch.randn(out, 256, 3, 3, generator=g)
        if bias:
            state[f"{prefix}.{name}.bias"] = torch.randn(out, generator=g)
    state |= {f"{prefix}.scales.{i}.scale": torch.rand(1, generator=g) + 0.5 for i in range(5)}


def adelaidet_state(g):
    """detectron2 / AdelaiDet names: MSRA ResNet-50 (stride in conv1), FPN on res3..res5, P6/P7 from P5."""
    s, r = {}, "backbone.bottom_up"
    s[f"{r}.stem.conv1.weight"] = torch.randn(64, 3, 7, 7, generator=g)
    _bn(s, f"{r}.stem.conv1.norm", 64, g)
    inp = 64
    for stage, blocks in zip(range(2, 6), (3, 4, 6, 3)):
        mid = 64 * 2 ** (stage - 2)
        for b in range(blocks):
            p = f"{r}.res{stage}.{b}"
            if b == 0:
                s[f"{p}.shortcut.weight"] = torch.randn(4 * mid, inp, 1, 1, generator=g)
                _bn(s, f"{p}.shortcut.norm", 4 * mid, g)
            for k, shape in ((1, (mid, inp, 1, 1)), (2, (mid, mid, 3, 3)), (3, (4 * mid, mid, 1, 1))):
                s[f"{p}.conv{k}.weight"] = torch.randn(*shape, generator=g)
                _bn(s, f"{p}.conv{k}.norm", shape[0], g)
            inp = 4 * mid
    for level, c in ((3, 512), (4, 1024), (5, 2048)):
        s |= {f"backbone.fpn_lateral{level}.weight": torch.randn(256, c, 1, 1, generator=g),
              f"backbone.fpn_lateral{level}.bias": torch.randn(256, generator=g),
              f"backbone.fpn_output{level}.weight": torch.randn(256, 256, 3, 3, generator=g),
              f"backbone.fpn_output{level}.bias": torch.randn(256, generator=g)}
    for n in ("p6", "p7"):
        s |= {f"backbone.top_block.{n}.weight": torch.randn(256, 256, 3, 3, generator=g),
              f"backbone.top_block.{n}.bias": torch.randn(256, generator=g)}
    _head(s, "proposal_generator.fcos_head", g)
    return s


def msad_side(s, side, width, g):
    """One released MSAD model (T_ or S_): slimmable ResNet-50 (full-size convs, a BN set per width), the FPN at
    `width` on res2..res5 with P6/P7 from res5, the head without box and centre-ness biases."""
    widths, r = convert.WIDTHS, f"{side}_backbone.bottom_up"
    s[f"{r}.features.0.0.weight"] = torch.randn(64, 3, 7, 7, generator=g)
    for j, w in enumerate(widths):
        _bn(s, f"{r}.features.0.1.bn.{j}", int(64 * w), g, counter=True)
    inp, n = 64, 1
    for stage, blocks in enumerate((3, 4, 6, 3)):
        mid = 64 * 2 ** stage
        for b in range(blocks):
            p = f"{r}.features.{n}"
            for conv, bn, shape in ((0, 1, (mid, inp, 1, 1)), (3, 4, (mid, mid, 3, 3)), (6, 7, (4 * mid, mid, 1, 1))):
                s[f"{p}.body.{conv}.weight"] = torch.randn(*shape, generator=g)
                for j, w in enumerate(widths):
                    _bn(s, f"{p}.body.{bn}.bn.{j}", int(shape[0] * w), g, counter=True)
            if b == 0:
                s[f"{p}.shortcut.0.weight"] = torch.randn(4 * mid, inp, 1, 1, generator=g)
                for j, w in enumerate(widths):
                    _bn(s, f"{p}.shortcut.1.bn.{j}", int(4 * mid * w), g, counter=True)
            inp, n = 4 * mid, n + 1
    for level, c in ((2, 256), (3, 512), (4, 1024), (5, 2048)):
        s |= {f"{side}_backbone.fpn_lateral{level}.weight": torch.randn(256, int(c * width), 1, 1, generator=g),
              f"{side}_backbone.fpn_lateral{level}.bias": torch.randn(256, generator=g),
              f"{side}_backbone.fpn_output{level}.weight": torch.randn(256, 256, 3, 3, generator=g),
              f"{side}_backbone.fpn_output{level}.bias": torch.randn(256, generator=g)}
    s |= {f"{side}_backbone.top_block.p6.weight": torch.randn(256, int(2048 * width), 3, 3, generator=g),
          f"{side}_backbone.top_block.p7.weight": torch.randn(256, 256, 3, 3, generator=g)}
    s |= {f"{side}_backbone.top_block.{n}.bias": torch.randn(256, generator=g) for n in ("p6", "p7")}
    _head(s, f"{side}_fcos_head", g, box_bias=False)


def msad_state(width, student, g):
    s = {"SE.fc.0.weight": torch.randn(32, 512, generator=g), "SE.fc.2.weight": torch.randn(2, 32, generator=g)}
    msad_side(s, "T", width, g)
    if student:
        msad_side(s, "S", width, g)
    return s


def check_round_trip(source, ckpt):
    """Every converted tensor is its source tensor (cut to the width, or the COCO rows); and back again."""
    model, mapping = ckpt["model"], ckpt["converted_from"]["map"]
    for ours, theirs in mapping.items():
        src = source[theirs]
        if ours == "backbone.conv1.weight":  # BGR -> RGB with the std folded: checked by the next test
            continue
        want = src[tuple(slice(0, n) for n in model[ours].shape)] if src.dim() == model[ours].dim() else src.reshape(())
        assert torch.equal(model[ours], want), ours
    back = convert.to_source(ckpt)
    for theirs, t in back.items():
        want = source[theirs][tuple(slice(0, n) for n in t.shape)]
        assert torch.allclose(t, want, rtol=1e-6, atol=1e-6), theirs


def test_adelaidet_fcos_maps_tensor_by_tensor_and_back(tmp_path):
    source = adelaidet_state(torch.Generator().manual_seed(0))
    torch.save({"model": source, "__author__": "AdelaiDet"}, tmp_path / "FCOS_R_50_1x.pth")
    ckpt = convert.convert("adelaidet", tmp_path / "FCOS_R_50_1x.pth")
    assert ckpt["kind"] == "fcos" and ckpt["args"]["stride_in_1x1"] and ckpt["args"]["p6_from"] == "p5"
    assert not ckpt["report"]["new"] and not ckpt["report"]["dropped"]
    assert len(ckpt["converted_from"]["map"]) == len(source)  # every source tensor used
    check_round_trip(source, ckpt)


@pytest.mark.parametrize("width,student", [(1.0, False), (0.5, True)])
def test_released_msad_files_map_tensor_by_tensor_at_their_width(tmp_path, width, student):
    source = msad_state(width, student, torch.Generator().manual_seed(1))
    torch.save({"model": source, "iteration": 180000}, tmp_path / "msad.pth")
    ckpt = convert.convert("msad", tmp_path / "msad.pth")
    assert ckpt["kind"] == ("student" if student else "teacher") and ckpt["args"]["width"] == width
    side, index = ("S" if student else "T"), convert.WIDTHS.index(width)
    assert torch.equal(ckpt["model"]["backbone.bn1.running_mean"],
                       source[f"{side}_backbone.bottom_up.features.0.1.bn.{index}.running_mean"])  # the width's BN set
    assert ckpt["model"]["backbone.layer4.0.conv2.weight"].shape == (int(512 * width),) * 2 + (3, 3)
    assert set(ckpt["report"]["new"]) == {"head.box_pred.bias", "head.ctr_pred.bias"}
    assert all(ckpt["model"][k].abs().sum() == 0 for k in ckpt["report"]["new"])
    if not student:
        assert torch.equal(ckpt["model"]["fusion.gate.0.weight"], source["SE.fc.0.weight"])
    check_round_trip(source, ckpt)
    model, _ = model_from_checkpoint(ckpt, "msad.pth")  # loads as our teacher / student
    assert sum(p.numel() for p in model.parameters()) > 0


def test_the_bgr_first_conv_becomes_ours_exactly():
    """detectron2 feeds BGR minus the mean, std 1; ours is RGB divided by the std: the same first layer."""
    g = torch.Generator().manual_seed(3)
    source = torch.randn(64, 3, 7, 7, generator=g)
    image = torch.randint(0, 256, (1, 3, 40, 56), dtype=torch.uint8, generator=g)
    bgr = image.flip(1).float() - torch.tensor([103.53, 116.28, 123.675]).view(1, 3, 1, 1)
    theirs = F.conv2d(bgr, source, stride=2, padding=3)
    ours = F.conv2d(normalize(image), convert._rgb_std(source), stride=2, padding=3)
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-2)


def test_stride_in_1x1_moves_only_the_stride():
    trunk = ResNetTrunk(50, "frozen_bn", 0.25, stride_in_1x1=True)
    assert trunk.layer2[0].conv1.stride == (2, 2) and trunk.layer2[0].conv2.stride == (1, 1)
    shapes = [f.shape[-2:] for f in trunk(torch.zeros(1, 3, 64, 64))]
    assert shapes == [f.shape[-2:] for f in ResNetTrunk(50, "frozen_bn", 0.25)(torch.zeros(1, 3, 64, 64))]


def test_a_file_of_another_format_is_refused_in_one_line(torchvision_fcos, tmp_path):
    _, path = torchvision_fcos
    proc = run("-m", "msad.convert", "adelaidet", path, tmp_path / "out.pth")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1
    assert "is not a adelaidet checkpoint" in proc.stderr and "backbone.body.conv1.weight" in proc.stderr
    assert not (tmp_path / "out.pth").exists()


def test_unknown_tensors_are_refused_not_dropped(tmp_path):
    source = adelaidet_state(torch.Generator().manual_seed(0))
    source["proposal_generator.fcos_head.share_tower.0.weight"] = torch.zeros(256, 256, 3, 3)
    torch.save(source, tmp_path / "fcos.pth")
    with pytest.raises(ValueError, match="has no place for"):
        convert.convert("adelaidet", tmp_path / "fcos.pth")


# ------------------------------------------------------------------ reliability: what convert refuses, in one line
@pytest.fixture(scope="module")
def adelaidet_file(tmp_path_factory):
    source = adelaidet_state(torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("adelaidet") / "FCOS_R_50_1x.pth"
    torch.save({"model": source}, path)
    return source, path


def test_out_is_never_the_source_and_an_existing_out_needs_overwrite(adelaidet_file, tmp_path):
    _, src = adelaidet_file
    before = src.read_bytes()
    (tmp_path / "link.pth").symlink_to(src)
    for out in (src, tmp_path / "link.pth", f"{src.parent}/./{src.name}"):  # the same file, however named
        with pytest.raises(ValueError, match="is the source file"):
            convert.main(["adelaidet", str(src), str(out), "--overwrite"])
    assert src.read_bytes() == before
    out = tmp_path / "model_final.pth"
    out.write_bytes(b"a trained model")
    with pytest.raises(FileExistsError, match="already exists; add --overwrite"):
        convert.main(["adelaidet", str(src), str(out)])
    assert out.read_bytes() == b"a trained model"
    assert convert.main(["adelaidet", str(src), str(out), "--overwrite"])["kind"] == "fcos"
    assert torch.load(out, weights_only=True)["converted_from"]["format"] == "adelaidet"


def test_non_finite_weights_are_refused_naming_the_tensor(adelaidet_file, tmp_path):
    source, _ = adelaidet_file
    bad = dict(source)
    bad["backbone.fpn_output4.bias"] = source["backbone.fpn_output4.bias"].clone()
    bad["backbone.fpn_output4.bias"][[3, 7]] = torch.tensor([float("nan"), float("inf")])
    torch.save(bad, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match=r"backbone\.fpn_output4\.bias holds 2 NaN or infinite values"):
        convert.main(["adelaidet", str(tmp_path / "nan.pth"), str(tmp_path / "out.pth")])
    assert not (tmp_path / "out.pth").exists()


def _adelaidet_with(source, key, value):
    return {**source, key: value}


@pytest.mark.parametrize("key,shape", [
    ("backbone.bottom_up.stem.conv1.weight", (64, 4, 7, 7)),  # an RGBA / 4-channel stem
    ("proposal_generator.fcos_head.scales.2.scale", (2,)),
    ("proposal_generator.fcos_head.cls_logits.weight", (20, 256, 3, 3)),  # another dataset's classes
])
def test_a_tensor_of_the_wrong_shape_is_one_line_naming_it_and_both_shapes(adelaidet_file, tmp_path, key, shape):
    source, _ = adelaidet_file
    torch.save(_adelaidet_with(source, key, torch.zeros(shape)), tmp_path / "fcos.pth")
    with pytest.raises(ValueError, match=re.escape(f"{key} {shape}")) as e:
        convert.convert("adelaidet", tmp_path / "fcos.pth")
    assert "cannot take" in str(e.value) and "\n" not in str(e.value)


def test_torchvision_fcos_of_another_class_count_is_one_line(tmp_path):
    tv = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2)
    torch.save(tv.state_dict(), tmp_path / "fcos2.pth")
    with pytest.raises(ValueError, match=re.escape("head.classification_head.cls_logits.weight (2, 256, 3, 3) "
                                                   "for head.cls_logits.weight (80, 256, 3, 3)")):
        convert.convert("torchvision", tmp_path / "fcos2.pth")


def test_width_and_text_files_are_refused_with_their_real_reason(torchvision_fcos, tmp_path):
    _, path = torchvision_fcos
    with pytest.raises(ValueError, match="is not a msad checkpoint: it lacks T_backbone") as e:
        convert.main(["msad", str(path), str(tmp_path / "o.pth"), "--width", "0.5"])
    assert "trained at width" not in str(e.value)
    with pytest.raises(ValueError, match="--width 0.5 is for the released slimmable MSAD files"):
        convert.main(["torchvision", str(path), str(tmp_path / "o.pth"), "--width", "0.5"])
    (tmp_path / "notes.pth").write_text("hello, this is a text file\n")
    with pytest.raises(ValueError, match=r"not a file of torch.save: it starts with b'hello, t'") as e:
        convert.main(["torchvision", str(tmp_path / "notes.pth"), str(tmp_path / "o.pth")])
    assert "101" not in str(e.value)
    assert not (tmp_path / "o.pth").exists()
