"""The built-in demo dataset: coloured shapes on textured backgrounds, written in real COCO format.

It lets every part of the project (training, distillation, evaluation with COCOeval) run end to end
without downloading COCO. Eight classes differ in form and in hue (jittered); objects range log-uniformly
from about 6 px to half the image side, so that, as on COCO, halving the resolution hurts the small ones,
which is what MSAD is about. Backgrounds are smooth noise, gradients or stripes in muted colours, so the
saturated shapes stand out. Objects may overlap mildly: none is more than 60% hidden, and its box is the
tight box of its visible pixels (`area` is its visible pixel count, as in COCO) and its `segmentation` the
compressed RLE of those pixels (the holes of rings and frames excluded from it), for instance segmentation.

The layout is COCO's, so `--data-root root` works:
    root/annotations/instances_{train,val}2017.json, root/{train,val}2017/*.png, root/meta.json
Everything is a function of the parameters (same seed -> byte-identical files). `ensure_synthetic`
generates on first use and reuses the data while `meta.json` matches the parameters.

    python -m msad.synthetic --root data/synthetic
"""
import argparse
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_util

try:
    import fcntl  # POSIX: serialises concurrent generation by several ranks
except ImportError:  # pragma: no cover - Windows
    fcntl = None

GENERATOR_VERSION = 1  # bump when the drawing code changes, so stale datasets are regenerated
# (COCO category id, name, hue in degrees). Ids are deliberately non-contiguous, like COCO's. Shapes of a
# similar form (disc/ring, square/frame) get opposite hues.
CATEGORIES = [(1, "disc", 0), (2, "ring", 180), (4, "square", 90), (5, "frame", 270),
              (7, "triangle", 45), (8, "diamond", 225), (10, "cross", 135), (13, "star", 315)]
MIN_OBJECT = 6.0  # px, smallest object side; the largest is half the image's short side
OBJECTS_PER_IMAGE = (3, 12)
MAX_HIDDEN = 0.6  # an object may lose at most this fraction of its pixels to later ones
SPLITS = {"train": (0, 1), "val": (1, 1_000_001)}  # split -> (rng stream, first image id)


# ----------------------------------------------------------------------------------------------------
# drawing
# ----------------------------------------------------------------------------------------------------
def hsv_to_rgb(h, s, v) -> np.ndarray:
    """HSV (h in degrees, s and v in 0..1; arrays broadcast) -> RGB in 0..1 on a new last axis."""
    h, s, v = np.broadcast_arrays(np.asarray(h, float) % 360 / 60, s, v)
    k = (np.array([5, 3, 1]) + h[..., None]) % 6  # ... x 3
    return v[..., None] - v[..., None] * s[..., None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def shape_mask(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test of a class's shape in box coordinates u, v in [-1, 1] (pixel centres)."""
    au, av, r2 = np.abs(u), np.abs(v), u * u + v * v
    if name == "disc":
        return r2 <= 1
    if name == "ring":
        return (r2 <= 1) & (r2 >= 0.3)
    if name == "square":
        return (au <= 1) & (av <= 1)
    if name == "frame":
        return (au <= 1) & (av <= 1) & ((au >= 0.5) | (av >= 0.5))
    if name == "triangle":  # apex at the top
        return (av <= 1) & (au <= (v + 1) / 2)
    if name == "diamond":
        return au + av <= 1
    if name == "cross":
        return ((au <= 0.34) & (av <= 1)) | ((av <= 0.34) & (au <= 1))
    if name == "star":  # five sharp points: the boundary radius goes 1 -> 0.4 -> 1 between points
        phase = (np.arctan2(u, -v) * 5 / (2 * np.pi)) % 1
        return np.sqrt(r2) <= 0.4 + 0.6 * (1 - 2 * phase) ** 2
    raise ValueError(f"unknown shape {name!r}")


def muted_colour(rng) -> np.ndarray:
    """A background colour: low saturation, any hue, mid brightness."""
    return hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0, 0.35), rng.uniform(0.15, 0.85))


def background(rng, h: int, w: int) -> np.ndarray:
    """h x w x 3 float32 texture in 0..1: smooth noise, a gradient or soft stripes, chosen at random."""
    kind = rng.integers(3)
    if kind == 0:  # smooth noise: a coarse grid of muted colours, upsampled bicubically
        gh, gw = rng.integers(2, 9, size=2)
        grid = np.stack([muted_colour(rng) for _ in range(gh * gw)]).reshape(gh, gw, 3)
        small = Image.fromarray((grid * 255).round().astype(np.uint8))
        return np.asarray(small.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255
    y, x = np.ogrid[0:h, 0:w]
    angle = rng.uniform(0, np.pi)
    proj = (x * np.cos(angle) + y * np.sin(angle)).astype(np.float32)  # h x w
    if kind == 1:  # linear gradient between two colours
        t = (proj - proj.min()) / max(np.ptp(proj), 1)
    else:  # soft stripes
        t = 0.5 + 0.5 * np.sin(proj * np.float32(2 * np.pi / rng.uniform(8, 48)))
    c0, c1 = muted_colour(rng).astype(np.float32), muted_colour(rng).astype(np.float32)
    return c0 + t[..., None] * (c1 - c0)  # h x w x 3


def render_image(rng, short: int, long: int) -> tuple[np.ndarray, list]:
    """One image: uint8 h x w x 3 and its objects [(category index, x0, y0, x1, y1, visible area, RLE counts of
    the visible pixels)]."""
    s = round(short * rng.uniform(0.875, 1.125))
    l = round(s * long / short * rng.uniform(0.9, 1.15))
    h, w = (s, l) if rng.random() < 0.5 else (l, s)  # landscape or portrait
    img = background(rng, h, w)  # h x w x 3
    owner = np.full((h, w), -1, dtype=np.int16)  # which object each pixel shows
    areas, visible, classes, regions = [], [], [], []  # per placed object: drawn and visible pixels, ...
    for _ in range(rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1)):
        c = int(rng.integers(len(CATEGORIES)))
        side = math.exp(rng.uniform(math.log(MIN_OBJECT), math.log(min(h, w) / 2)))
        aspect = math.exp(rng.uniform(-0.3, 0.3)) if CATEGORIES[c][1] != "star" else 1.0
        bw, bh = min(side * math.sqrt(aspect), w), min(side / math.sqrt(aspect), h)
        colour = hsv_to_rgb(CATEGORIES[c][2] + rng.uniform(-10, 10), rng.uniform(0.7, 1), rng.uniform(0.65, 1))
        shade = rng.uniform(-0.15, 0.15, size=2)  # a mild linear shading across the object
        for _attempt in range(20):  # find a place where no earlier object gets more than 60% hidden
            x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            xs, ys = slice(int(x0), math.ceil(x0 + bw)), slice(int(y0), math.ceil(y0 + bh))
            v, u = np.mgrid[ys, xs] + 0.5  # pixel centres of the box region
            u, v = (u - x0) / bw * 2 - 1, (v - y0) / bh * 2 - 1
            mask = shape_mask(CATEGORIES[c][1], u, v)
            covered = owner[ys, xs][mask]
            lost = np.bincount(covered[covered >= 0], minlength=len(areas))  # pixels each object would lose
            if mask.any() and np.all(np.subtract(visible, lost) >= (1 - MAX_HIDDEN) * np.asarray(areas)):
                break
        else:
            continue  # no room for this one
        owner[ys, xs][mask] = len(areas)
        img[ys, xs][mask] = np.clip(colour * (1 + shade[0] * u + shade[1] * v)[..., None], 0, 1)[mask]
        visible = (np.subtract(visible, lost)).tolist() + [int(mask.sum())]
        areas.append(int(mask.sum()))
        classes.append(c)
        regions.append((ys, xs))
    objects = []
    for k, (c, (ys, xs)) in enumerate(zip(classes, regions)):  # tight box and RLE of the visible pixels
        rows, cols = np.nonzero(owner[ys, xs] == k)
        rle = mask_util.encode(np.asfortranarray(owner == k, dtype=np.uint8))  # a ring's or frame's hole is not in it
        objects.append((c, xs.start + int(cols.min()), ys.start + int(rows.min()),
                        xs.start + int(cols.max()) + 1, ys.start + int(rows.max()) + 1, len(rows),
                        rle["counts"].decode("ascii")))
    return (img * 255).round().astype(np.uint8), objects


def _render_to_file(job) -> tuple:
    """Worker: draw image i of a split from its own random stream and save it as PNG."""
    seed, stream, i, short, long, path = job
    img, objects = render_image(np.random.default_rng([seed, stream, i]), short, long)
    Image.fromarray(img).save(path, format="PNG", compress_level=3)
    return img.shape[:2], objects


# ----------------------------------------------------------------------------------------------------
# writing the dataset
# ----------------------------------------------------------------------------------------------------
def _params(num_train, num_val, seed, image_size) -> dict:
    return {"generator": "msad.synthetic", "generator_version": GENERATOR_VERSION, "num_train": int(num_train), "num_val": int(num_val),
            "seed": int(seed), "image_size": [int(x) for x in image_size], "min_object": MIN_OBJECT,
            "objects_per_image": list(OBJECTS_PER_IMAGE), "max_hidden": MAX_HIDDEN,
            "segmentation": "rle"}  # the masks came after version 1's images and boxes, which they leave as they were


def is_current(root, params: dict) -> bool:
    """True when root holds a complete dataset generated with exactly these parameters."""
    root = Path(root)
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta == params and all((root / "annotations" / f"instances_{s}2017.json").is_file() for s in SPLITS)


def _check_replaceable(root: Path) -> None:
    """Only an earlier synthetic dataset (or an empty folder) may be replaced: never delete other data."""
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return
    try:
        ours = "generator_version" in json.loads((root / "meta.json").read_text())
    except (OSError, ValueError, TypeError):  # no meta.json, not JSON, or not an object
        ours = False
    if not ours:
        raise FileExistsError(f"{root} exists and is not a synthetic dataset (no msad meta.json); "
                              "refusing to overwrite it: choose another --data-root")


def _write_split(out: Path, split: str, count: int, params: dict, pool) -> None:
    stream, first_id = SPLITS[split]
    (out / f"{split}2017").mkdir(parents=True)
    short, long = params["image_size"]
    ids = range(first_id, first_id + count)
    jobs = [(params["seed"], stream, i, short, long, out / f"{split}2017" / f"{image_id:012d}.png")
            for i, image_id in enumerate(ids)]
    results = pool.map(_render_to_file, jobs, chunksize=8) if pool else map(_render_to_file, jobs)
    images, annotations = [], []
    for image_id, job, ((h, w), objects) in zip(ids, jobs, results):
        images.append({"id": image_id, "file_name": job[-1].name, "width": w, "height": h})
        for c, x0, y0, x1, y1, area, counts in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": CATEGORIES[c][0],
                                "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                                "area": float(area), "iscrowd": 0,
                                "segmentation": {"size": [h, w], "counts": counts}})
    coco = {"info": {"description": "msad synthetic shapes", "version": str(GENERATOR_VERSION)},
            "licenses": [], "images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n, "supercategory": "shape"} for i, n, _ in CATEGORIES]}
    (out / "annotations").mkdir(exist_ok=True)
    (out / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(coco, separators=(",", ":")))


@contextmanager
def _lock(root: Path):
    """Exclusive lock beside root, so that ranks started together generate once and the others wait."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as f:
        if fcntl:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def ensure_synthetic(root="data/synthetic", num_train: int = 1000, num_val: int = 200, seed: int = 0,
                     image_size=(256, 320), workers: int | None = None) -> str:
    """Generate the synthetic COCO-format dataset under root unless it is already there; returns root.

    image_size is the (short, long) side of a typical image; each image jitters it by about +-12% and is
    landscape or portrait at random. workers: processes for drawing (default: all cores for large sets).
    Generation goes to a temporary folder renamed into place, so an interrupted run leaves no half dataset.
    """
    root = Path(root)
    params = _params(num_train, num_val, seed, image_size)
    if is_current(root, params):
        return str(root)
    with _lock(root):
        if is_current(root, params):  # another process generated it while we waited
            return str(root)
        _check_replaceable(root)
        for stale in root.parent.glob(f".{root.name}.tmp-*"):  # left by an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private
        if workers is None:
            workers = min(os.cpu_count() or 1, 8) if num_train + num_val >= 64 else 1
        pool = Pool(workers) if workers > 1 else None
        try:
            for split, count in (("train", num_train), ("val", num_val)):
                _write_split(tmp, split, count, params, pool)
            (tmp / "meta.json").write_text(json.dumps(params, indent=1))
            if root.exists():  # an old synthetic dataset: move it aside atomically, then delete it
                old = tmp.with_name(tmp.name + "-old")
                os.rename(root, old)
                shutil.rmtree(old)
            os.rename(tmp, root)
        finally:
            if pool:
                pool.close()
                pool.join()
            shutil.rmtree(tmp, ignore_errors=True)  # only still there if something failed
    return str(root)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write the synthetic shapes dataset in COCO format.")
    p.add_argument("--root", default="data/synthetic", help="output folder (COCO layout)")
    p.add_argument("--num-train", type=int, default=1000)
    p.add_argument("--num-val", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, nargs=2, default=(256, 320), metavar=("SHORT", "LONG"))
    p.add_argument("--workers", type=int, default=None, help="drawing processes (default: all cores)")
    a = p.parse_args(argv)
    fresh = not is_current(a.root, _params(a.num_train, a.num_val, a.seed, a.image_size))
    t0 = time.perf_counter()
    root = ensure_synthetic(a.root, a.num_train, a.num_val, a.seed, a.image_size, a.workers)
    what = f"wrote {a.num_train} train + {a.num_val} val images" if fresh else "already up to date"
    print(f"synthetic dataset at {root}: {what} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
