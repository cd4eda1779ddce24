"""msad.data on a tiny COCO json written here: filtering, label mapping, resizing, flipping, batching,
the deterministic distributed sampler, and the one-line DatasetError messages."""
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from msad.cli import data_paths
from msad.data import PAD_VALUE, CocoDetection, DatasetError, ImageBatch, collate
from msad.imagenet import normalize
from msad.samplers import EvalBatchSampler, TrainBatchSampler, build_eval_loader, build_train_loader

# image id -> (height, width, PIL mode); ids and categories deliberately unsorted and non-contiguous
IMAGES = {5: (40, 60, "RGB"), 2: (50, 30, "L"), 9: (30, 40, "RGBA"), 7: (32, 32, "RGB")}
CATEGORIES = [{"id": 11, "name": "eleven"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]
ANNOTATIONS = [  # (image_id, category_id, bbox xywh, iscrowd)
    (5, 3, [10, 5, 20, 10], 0),
    (5, 7, [0, 0, 60, 40], 1),  # crowd: ignored
    (5, 3, [30, 10, 0, 8], 0),  # zero width: dropped and counted
    (2, 7, [5, 40, 30, 20], 0),  # reaches past the bottom-right corner: clipped to (5, 40, 30, 50)
    (2, 11, [0, 0, 10, 10], 0),
    (9, 11, [4, 6, 8, 12], 0),
]  # image 7 has no annotation


def make_coco(root, annotations=ANNOTATIONS, images=IMAGES):
    """Write the images and the json under root; returns (ann_file, image_dir, json dict)."""
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w, mode) in images.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8)).convert(mode).save(image_dir / f"{i}.png")
    data = {"images": [{"id": i, "file_name": f"{i}.png", "height": h, "width": w} for i, (h, w, _) in images.items()],
            "annotations": [{"id": k + 1, "image_id": i, "category_id": c, "bbox": b, "iscrowd": z}
                            for k, (i, c, b, z) in enumerate(annotations)],
            "categories": CATEGORIES}
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps(data))
    return str(ann_file), str(image_dir), data


@pytest.fixture
def coco(tmp_path):
    return make_coco(tmp_path)


def train_set(coco, sizes=(20, 24), max_size=1000, **kw):
    return CocoDetection(coco[0], coco[1], train=True, sizes=sizes, max_size=max_size, **kw)


def eval_set(coco, sizes=(20, 24), max_size=1000):
    return CocoDetection(coco[0], coco[1], train=False, sizes=sizes, max_size=max_size)


# -- loading and filtering -----------------------------------------------------------------------------
def test_train_drops_crowd_degenerate_and_empty(coco, caplog):
    with caplog.at_level(logging.WARNING, logger="msad.coco"):
        ds = train_set(coco)
    assert ds.image_ids == [2, 5, 9]  # image 7 has no usable box; sorted id order
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropped 1 boxes" in warnings[0] and coco[0] in warnings[0]
    assert len(ds._boxes) == 4  # of 6: minus the crowd box, minus the zero-width one
    assert ds.aspect_ratios() == [30 / 50, 60 / 40, 40 / 30]
    assert ds.coco is None


def test_eval_keeps_all_images(coco):
    ds = eval_set(coco)
    assert ds.image_ids == [2, 5, 7, 9]
    image, target = ds[ds.image_ids.index(7)]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert min(image.shape[1:]) == 24  # the test size is sizes[-1]
    assert sorted(ds.coco.getImgIds()) == [2, 5, 7, 9]  # pycocotools index for COCOeval


def test_label_mapping_round_trip(coco):
    ds = train_set(coco)
    assert ds.cat_ids == [3, 7, 11] and ds.num_classes == 3
    assert ds.class_names == ["three", "seven", "eleven"]
    assert ds.label_to_cat_id(torch.tensor([2, 0, 1])) == [11, 3, 7]
    assert all(ds.cat_id_to_label[c] == l for l, c in enumerate(ds.cat_ids))
    _, target = ds[ds.image_ids.index(2)]
    assert ds.label_to_cat_id(target["labels"]) == [7, 11]  # json order within the image


def test_modes_and_dtypes(coco):
    ds = eval_set(coco)
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.dtype == torch.uint8 and image.shape[0] == 3 and image.is_contiguous()
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        assert tuple(image.shape[1:]) == target["size"]


def test_resize_short_side_and_max_size(coco):
    ds = train_set(coco, sizes=[100], max_size=120, flip_prob=0.0)
    image, target = ds[ds.image_ids.index(5)]  # 40 x 60: short side 100 would make the long side 150 > 120
    assert target["orig_size"] == (40, 60) and target["size"] == (80, 120) and image.shape == (3, 80, 120)
    assert torch.equal(target["boxes"], torch.tensor([[20.0, 10.0, 60.0, 30.0]]))
    ds = train_set(coco, sizes=[60], flip_prob=0.0)
    _, target = ds[ds.image_ids.index(2)]  # 50 x 30 portrait -> 100 x 60, the box clipped first
    assert target["size"] == (100, 60)
    assert torch.allclose(target["boxes"], torch.tensor([[10.0, 80.0, 60.0, 100.0], [0.0, 0.0, 20.0, 20.0]]))


def test_flip_moves_boxes_and_is_deterministic(coco):
    plain = train_set(coco, sizes=[40], flip_prob=0.0)
    flipped = train_set(coco, sizes=[40], flip_prob=1.0)
    i = plain.image_ids.index(5)
    (a, ta), (b, tb) = plain[(i, 123)], flipped[(i, 123)]
    w = ta["size"][1]
    assert torch.equal(b, a.flip(-1))
    assert torch.allclose(tb["boxes"], torch.stack([w - ta["boxes"][:, 2], ta["boxes"][:, 1],
                                                    w - ta["boxes"][:, 0], ta["boxes"][:, 3]], 1))
    ds = train_set(coco, sizes=[20, 24, 28])
    first = [ds[(i, s)] for s in range(20)]
    again = [ds[(i, s)] for s in range(20)]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1]["boxes"], y[1]["boxes"]) for x, y in zip(first, again))
    assert {t["size"][0] for _, t in first} == {20, 24, 28}  # every size gets drawn
    assert len({t["boxes"][0, 0].item() for _, t in first if t["size"][0] == 20}) == 2  # flipped and not


# -- batching ----------------------------------------------------------------------------------------
def test_collate_pads_to_128_with_pad_value(coco):
    ds = train_set(coco, sizes=[130], max_size=200)
    samples = [ds[(i, 0)] for i in range(len(ds))]
    batch = collate(samples)
    assert isinstance(batch, ImageBatch) and batch.images.dtype == torch.uint8
    B, _, H, W = batch.images.shape
    assert B == 3 and H % 128 == 0 and W % 128 == 0 and H >= max(s[0].shape[1] for s in samples)
    assert batch.image_sizes == [t["size"] for _, t in samples] and batch.image_ids == ds.image_ids
    assert batch.orig_sizes == [(50, 30), (40, 60), (30, 40)]
    for b, (image, _) in enumerate(samples):
        h, w = image.shape[1:]
        assert torch.equal(batch.images[b, :, :h, :w], image)
        pad = batch.images[b, :, h:, :].reshape(3, -1)
        assert (pad == torch.tensor(PAD_VALUE, dtype=torch.uint8)[:, None]).all()
    moved = batch.to("cpu")
    assert moved.targets[0]["boxes"].device.type == "cpu" and moved.image_sizes == batch.image_sizes
    assert collate(samples, size_divisible=32).images.shape[-1] % 32 == 0


def test_normalize_pad_value_is_zero():
    pad = torch.tensor(PAD_VALUE, dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    out = normalize(pad)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 4) and out.abs().max() < 0.03
    assert torch.allclose(normalize(pad.float()), out)


# -- sampler and loaders -----------------------------------------------------------------------------
def take(sampler, k):
    it = iter(sampler)
    return [next(it) for _ in range(k)]


def test_sampler_is_deterministic_and_resumable():
    ratios = [1.5, 0.7, 1.2, 0.5, 1.0, 0.8, 2.0] * 3  # 21 images
    a = take(TrainBatchSampler(ratios, 2, seed=3), 30)  # ~3 epochs
    assert a == take(TrainBatchSampler(ratios, 2, seed=3), 30)
    assert a != take(TrainBatchSampler(ratios, 2, seed=4), 30)
    for k in (1, 7, 12):
        assert take(TrainBatchSampler(ratios, 2, seed=3, start_iter=k), 30 - k) == a[k:]
    assert len({s for batch in a for _, s in batch}) > 40  # each (epoch, index) has its own aug seed
    epoch = [i for batch in take(TrainBatchSampler([1.0] * 20, 2, seed=3), 10) for i, _ in batch]
    assert sorted(epoch) == list(range(20))  # one epoch sees every image once


def test_sampler_groups_by_aspect():
    ratios = [1.5, 0.7, 1.2, 0.5, 1.0, 0.8, 2.0] * 3
    for batch in take(TrainBatchSampler(ratios, 3, seed=0), 20):
        assert len({ratios[i] < 1 for i, _ in batch}) == 1
    ungrouped = take(TrainBatchSampler(ratios, 3, seed=0, group_by_aspect=False), 20)
    assert any(len({ratios[i] < 1 for i, _ in b}) == 2 for b in ungrouped)


def test_sampler_ranks_partition_each_epoch():
    n = 11  # not a multiple of world_size: padded like DistributedSampler
    per_rank = [take(TrainBatchSampler([1.0] * n, 1, rank=r, world_size=2, seed=5), 6) for r in range(2)]
    epoch0 = [b[0][0] for r in range(2) for b in per_rank[r]]
    assert len(epoch0) == 12 and set(epoch0) == set(range(n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(5)).tolist()
    assert [b[0][0] for b in per_rank[0]] == (perm + perm[:1])[0::2]


def test_loaders(coco):
    ds = train_set(coco)
    loader = build_train_loader(ds, 2, rank=0, world_size=1, seed=0, workers=0)
    it = iter(loader)
    batches = [next(it) for _ in range(4)]  # infinite: more batches than one epoch
    assert all(isinstance(b, ImageBatch) and b.images.shape[-1] % 128 == 0 for b in batches)
    resumed = next(iter(build_train_loader(ds, 2, rank=0, world_size=1, seed=0, workers=0, start_iter=3)))
    assert resumed.image_ids == batches[3].image_ids and torch.equal(resumed.images, batches[3].images)
    it = iter(build_train_loader(ds, 2, rank=0, world_size=1, seed=0, workers=2))
    in_workers = [next(it) for _ in range(4)]  # augmentation does not depend on which process loads
    assert all(torch.equal(a.images, b.images) and a.image_ids == b.image_ids for a, b in zip(batches, in_workers))
    ev = eval_set(coco)
    ids = [i for r in range(3) for b in build_eval_loader(ev, 2, r, 3, workers=0) for i in b.image_ids]
    assert sorted(ids) == ev.image_ids


def test_eval_batches_only_hold_images_of_one_padded_shape(coco):
    ev = eval_set(coco)  # ids 2, 5, 7, 9 at short side 24: 40x24, 24x36, 24x24, 24x32
    shapes = ev.padded_shapes(32)
    alone = [tuple(collate([ev[i]], 32).images.shape[-2:]) for i in range(len(ev))]
    assert [tuple(s) for s in shapes.tolist()] == alone == [(64, 32), (32, 64), (32, 32), (32, 32)]
    for world in (1, 2):
        batches = [b for r in range(world) for b in EvalBatchSampler(shapes, 3, r, world)]
        assert sorted(i for b in batches for i in b) == list(range(len(ev)))  # every image once
        assert all(len({alone[i] for i in b}) == 1 for b in batches)
    loader = build_eval_loader(ev, 4, 0, 1, workers=0, size_divisible=32)
    assert len(loader) == 3  # the two 32x32 images together, the others alone
    for batch in loader:
        assert all(tuple(batch.images.shape[-2:]) == alone[ev.image_ids.index(i)] for i in batch.image_ids)
    assert list(EvalBatchSampler(shapes[:1], 2, 1, 2)) == []  # a rank without images


def test_data_paths_follow_the_coco_layout_unless_overridden():
    args = SimpleNamespace(data_root="root", val_ann=None, val_images=None, train_ann="mine.json", train_images=None)
    assert data_paths(args, "val") == (os.path.join("root", "annotations", "instances_val2017.json"),
                                       os.path.join("root", "val2017"))
    assert data_paths(args, "train") == ("mine.json", os.path.join("root", "train2017"))  # override wins


# -- errors ------------------------------------------------------------------------------------------
def rewrite(coco, edit):
    ann_file, image_dir, data = coco
    data = json.loads(json.dumps(data))
    edit(data)
    with open(ann_file, "w") as f:
        json.dump(data, f)
    return ann_file, image_dir


def check_error(ann_file, image_dir, *words, train=True):
    with pytest.raises(DatasetError) as e:
        CocoDetection(ann_file, image_dir, train=train, sizes=[20], max_size=100)
    msg = str(e.value)
    assert "\n" not in msg and ann_file in msg and all(w in msg for w in words), msg


def test_missing_and_malformed_file(coco, tmp_path):
    check_error(str(tmp_path / "nope.json"), coco[1], "not found")
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [\n  {"id": 1,}\n]}')
    check_error(str(bad), coco[1], "malformed JSON", "line 2")


@pytest.mark.parametrize("edit, words", [
    (lambda d: d.pop("images"), ["'images'"]),
    (lambda d: d["annotations"][3].pop("bbox"), ["annotations[3]", "'bbox'"]),
    (lambda d: d["images"][1].pop("width"), ["images[1]", "'width'"]),
    (lambda d: d["annotations"][2].update(image_id=99), ["annotations[2]", "image_id 99"]),
    (lambda d: d["annotations"][0].update(category_id=4), ["annotations[0]", "category_id 4"]),
    (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), ["annotations[1]", "'bbox'"]),
    (lambda d: [a.update(iscrowd=1) for a in d["annotations"]], ["no training images"]),
    (lambda d: d["images"][0].update(file_name="../5.png"), ["images[0]", "../5.png", "escapes"]),
    (lambda d: d["images"][0].update(file_name="/etc/passwd"), ["images[0]", "escapes"]),
])
def test_dataset_errors_name_file_and_field(coco, edit, words):
    check_error(*rewrite(coco, edit), *words)


def test_unreadable_image_skipped_in_training_raises_in_eval(coco, caplog):
    ann_file, image_dir, _ = coco
    with open(f"{image_dir}/5.png", "r+b") as f:  # truncate: the header survives, the pixels do not
        f.truncate(60)
    ds = train_set(coco, sizes=[20], flip_prob=0.0)
    i = ds.image_ids.index(5)
    with caplog.at_level(logging.WARNING, logger="msad.data"):
        image, target = ds[(i, 0)]
    assert target["image_id"] == ds.image_ids[i + 1] and ds.num_skipped_images == 1
    assert any("5.png" in r.getMessage() for r in caplog.records)
    with pytest.raises(DatasetError, match="5.png"):
        eval_set(coco)[eval_set(coco).image_ids.index(5)]
    Path(image_dir, "9.png").write_bytes(b"not an image")
    assert ds[(ds.image_ids.index(9), 0)][1]["image_id"] == 2  # wraps around to the first image


def test_image_folder_checked_for_training_only(coco, tmp_path):
    with pytest.raises(DatasetError, match="image folder not found"):
        CocoDetection(coco[0], str(tmp_path / "missing"), train=True, sizes=[20], max_size=100)
    ds = CocoDetection(coco[0], "", train=False, sizes=[20], max_size=100)  # scoring a results file: json only
    assert len(ds.coco.getAnnIds()) == len(ANNOTATIONS)


# -- ids and images that used to corrupt data silently (issue 14) -------------------------------------
@pytest.mark.parametrize("edit, words, train", [
    (lambda d: d["annotations"][0].update(category_id="3"), ["annotations[0]", "'category_id'", "'3'"], True),
    (lambda d: d["images"][1].update(id="2"), ["images[1]", "'id'", "'2'"], False),
    (lambda d: d["annotations"][2].update(image_id=5.5), ["annotations[2]", "'image_id'", "5.5"], True),
    (lambda d: d["categories"][0].update(id=True), ["categories[0]", "'id'", "True"], True),
    (lambda d: d["annotations"][4].update(id=1), ["annotations", "duplicate id 1"], False),
    (lambda d: d["annotations"][3].pop("id"), ["annotations[3]", "'id'"], False),
])
def test_ids_must_be_unique_integers(coco, edit, words, train):
    check_error(*rewrite(coco, edit), *words, train=train)


def test_ids_at_or_above_2_pow_53_stay_distinct(coco):
    big = 2 ** 53  # as float64, 2**53 and 2**53 + 1 are the same number

    def edit(d):
        d["images"][0]["id"], d["images"][1]["id"] = big, big + 1  # images 5 and 2
        for a in d["annotations"]:
            a["image_id"] = {5: big, 2: big + 1}.get(a["image_id"], a["image_id"])
            a["id"] += big
    ds = CocoDetection(*rewrite(coco, edit), train=False, sizes=[20], max_size=100)
    assert big in ds.image_ids and big + 1 in ds.image_ids and len(ds) == len(IMAGES)


def test_16_bit_png_is_scaled_not_clipped(coco):
    ann_file, image_dir, _ = coco
    grey = (np.arange(40 * 60, dtype=np.uint32).reshape(40, 60) * 27).astype(np.uint16)  # 0..64773
    Image.fromarray(grey).save(f"{image_dir}/5.png")  # mode I;16
    image, _ = eval_set(coco, sizes=[40])[eval_set(coco).image_ids.index(5)]
    expected = torch.from_numpy(np.round(grey / 257.0).astype(np.uint8))
    assert (image[0].int() - expected.int()).abs().max() <= 1 and (image[0] == image[2]).all()
    assert image.float().mean() < 200  # not all white


def test_exif_orientation_is_applied(coco):
    """A JPEG stored 60 wide x 40 high with orientation 6 (rotate 90 deg clockwise) is a 40 x 60 image: the
    json's size. A red block at the stored top-left must come out at the top-right, where the boxes are."""
    ann_file, image_dir, data = coco
    stored = np.zeros((40, 60, 3), dtype=np.uint8)
    stored[:10, :10] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(f"{image_dir}/2.jpg", exif=exif.tobytes(), quality=95)
    ann_file, image_dir = rewrite(coco, lambda d: d["images"][1].update(file_name="2.jpg", width=40, height=60))
    ds = CocoDetection(ann_file, image_dir, train=False, sizes=[40], max_size=100)
    image, target = ds[ds.image_ids.index(2)]
    assert target["size"] == (60, 40) and tuple(image.shape) == (3, 60, 40)
    assert image[0, :10, -10:].float().mean() > 200 and image[0, :10, :10].float().mean() < 50


def test_links_out_of_the_image_folder_and_fifos_are_not_opened(coco, tmp_path):
    ann_file, image_dir, _ = coco
    outside = tmp_path / "secret.png"
    Path(image_dir, "5.png").rename(outside)
    Path(image_dir, "5.png").symlink_to(outside)  # a valid image, but outside the folder
    with pytest.raises(DatasetError, match="outside the image folder"):
        eval_set(coco)[eval_set(coco).image_ids.index(5)]
    Path(image_dir, "7.png").rename(Path(image_dir, "real7.png"))
    Path(image_dir, "7.png").symlink_to("real7.png")  # a link that stays inside is fine
    assert eval_set(coco)[eval_set(coco).image_ids.index(7)][1]["image_id"] == 7
    Path(image_dir, "9.png").unlink()
    os.mkfifo(Path(image_dir, "9.png"))  # opening it would wait forever for a writer
    with pytest.raises(DatasetError, match="not a regular file"):
        eval_set(coco)[eval_set(coco).image_ids.index(9)]


def test_a_crash_with_a_live_loader_exits_instead_of_hanging(tmp_path):
    """Loader workers ignore SIGTERM (so a signalled job can save first); after an unexpected exception whose
    traceback keeps a persistent loader alive, Python's exit used to wait for them forever."""
    import subprocess
    import sys
    from msad.synthetic import ensure_synthetic
    root = ensure_synthetic(str(tmp_path / "synthetic"), num_train=2, num_val=4)
    script = (
        "import sys\n"
        "from msad.data import CocoDetection\n"
        "from msad.samplers import build_eval_loader\n"
        f"ds = CocoDetection('{root}/annotations/instances_val2017.json', '{root}/val2017', train=False,"
        " sizes=(128,), max_size=160)\n"
        "loader = build_eval_loader(ds, 1, 0, 1, workers=1)\n"
        "for batch in loader:\n"
        "    raise RuntimeError('a bug in the loop')\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "a bug in the loop" in proc.stderr
    assert "killed by signal" not in proc.stderr, proc.stderr[-2000:]
