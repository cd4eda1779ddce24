"""msad.synthetic: deterministic, COCO-format, loadable, varied; regenerated when its parameters change."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from msad import synthetic
from msad.cli import data_paths
from msad.data import CocoDetection
from msad.synthetic import CATEGORIES, ensure_synthetic

SMALL = dict(num_train=12, num_val=4, seed=0)


def files(root) -> dict:
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return ensure_synthetic(tmp_path_factory.mktemp("synth") / "synthetic", workers=1, **SMALL)


def test_deterministic_and_independent_of_workers(small, tmp_path):
    other = ensure_synthetic(tmp_path / "again", workers=2, **SMALL)
    a, b = files(small), files(other)
    assert len(a) == 12 + 4 + 3 and a == b  # images, two jsons, meta.json: byte-identical
    different = files(ensure_synthetic(tmp_path / "seed1", workers=1, **{**SMALL, "seed": 1}))
    assert different["annotations/instances_train2017.json"] != a["annotations/instances_train2017.json"]


def split_paths(root, split: str):
    """The scripts' paths of a split under --data-root (no overrides)."""
    return data_paths(SimpleNamespace(data_root=str(root), **{f"{split}_ann": None, f"{split}_images": None}), split)


def test_loads_through_coco_detection(small):
    for split, train, count in (("train", True, 12), ("val", False, 4)):
        ds = CocoDetection(*split_paths(small, split), train=train, sizes=[256], max_size=512)
        assert len(ds) == count and ds.num_classes == len(CATEGORIES)
        assert ds.class_names == [name for _, name, _ in sorted(CATEGORIES)]  # labels follow sorted ids
        image, target = ds[0]
        assert image.shape[0] == 3 and len(target["boxes"]) >= 1


def test_content_is_varied_coco(small):
    data = json.loads(Path(split_paths(small, "train")[0]).read_text())
    anns, images = data["annotations"], {i["id"]: i for i in data["images"]}
    boxes = np.array([a["bbox"] for a in anns])  # N x 4, xywh
    sides = boxes[:, 2:].max(1)
    assert sides.min() <= 10 and sides.max() >= 64  # small and large objects
    assert len({a["category_id"] for a in anns}) >= 6  # several classes in 12 images
    assert {i["width"] > i["height"] for i in images.values()} == {True, False}  # landscape and portrait
    counts = np.bincount([a["image_id"] for a in anns])
    assert counts[counts > 0].min() >= 1 and len(anns) >= 12 * 3
    for a in anns:
        img = images[a["image_id"]]
        x, y, w, h = a["bbox"]
        assert a["iscrowd"] == 0 and 0 < a["area"] <= w * h
        assert x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
    assert all(Path(small, "train2017", i["file_name"]).is_file() for i in images.values())


def test_reused_then_regenerated_when_meta_differs(tmp_path, monkeypatch):
    root = tmp_path / "synthetic"
    ensure_synthetic(root, workers=1, **SMALL)
    before = files(root)
    monkeypatch.setattr(synthetic, "_write_split", lambda *a: pytest.fail("regenerated needlessly"))
    ensure_synthetic(root, workers=1, **SMALL)  # meta matches: reused as is
    monkeypatch.undo()
    ensure_synthetic(root, workers=1, **{**SMALL, "num_val": 3})  # meta differs: regenerated
    after = files(root)
    assert len(list((root / "val2017").iterdir())) == 3 and after != before
    assert json.loads(after["meta.json"])["num_val"] == 3


def test_never_overwrites_other_data(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "instances_train2017.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        ensure_synthetic(root, workers=1, **SMALL)
    assert (root / "annotations" / "instances_train2017.json").read_text() == "{}"


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def boom(job):
        if job[2] == 5:
            raise KeyboardInterrupt
        return real(job)
    real = synthetic._render_to_file
    monkeypatch.setattr(synthetic, "_render_to_file", boom)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic(tmp_path / "synthetic", workers=1, **SMALL)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_cli(tmp_path, capsys):
    synthetic.main(["--root", str(tmp_path / "s"), "--num-train", "2", "--num-val", "1", "--workers", "1"])
    out = capsys.readouterr().out
    assert str(tmp_path / "s") in out and "wrote 2 train + 1 val images" in out
