"""What masks cost the data loader: time and memory per training sample with `CocoDetection(masks=True)`
against detection's, on the same images, interleaved (A B A B ...), one process.

Per sample, a mask model's target carries each object's mask inside its box at 28 x 28 (msad/masks.py), not
a full-image bitmap: the script reports both sizes, the crops' and what full-resolution bitmaps would be.

    python benchmarks/mask_data.py                          # the demo's train split
    python benchmarks/mask_data.py --data-root data/coco --images 200
"""
import argparse
import json
import os
import statistics
import sys
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from msad.data import CocoDetection  # noqa: E402
from msad.synthetic import ensure_synthetic  # noqa: E402


def timed(ds, key):
    t = time.perf_counter()
    sample = ds[key]
    return time.perf_counter() - t, sample


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default="data/synthetic")
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--size", type=int, default=256, help="short side (800 for COCO)")
    p.add_argument("--max-size", type=int, default=400)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "mask_data"))
    args = p.parse_args(argv)
    if args.data_root == "data/synthetic":
        ensure_synthetic(args.data_root)
    paths = (os.path.join(args.data_root, "annotations", "instances_train2017.json"),
             os.path.join(args.data_root, "train2017"))
    kw = dict(train=True, sizes=[args.size], max_size=args.max_size)
    tracemalloc.start()
    plain = CocoDetection(*paths, **kw)
    plain_mem = tracemalloc.get_traced_memory()[0]
    with_masks = CocoDetection(*paths, **kw, masks=True)
    masks_mem = tracemalloc.get_traced_memory()[0] - plain_mem
    tracemalloc.stop()
    n = min(args.images, len(plain))
    t_plain, t_masks, crop_bytes, full_bytes, image_bytes, objects = [], [], 0, 0, 0, 0
    for i in range(n):  # interleaved, same image and augmentation for both
        a, (image, _) = timed(plain, (i, i))
        b, (_, target) = timed(with_masks, (i, i))
        t_plain.append(a), t_masks.append(b)
        crop_bytes += target["masks"].numel()
        full_bytes += len(target["boxes"]) * target["size"][0] * target["size"][1]  # one uint8 bitmap per object
        image_bytes += image.numel()
        objects += len(target["boxes"])
    mp, mm = statistics.median(t_plain), statistics.median(t_masks)
    result = {"data": args.data_root, "images": n, "objects_per_image": round(objects / n, 2),
              "size": args.size, "median_ms_detection": round(1e3 * mp, 2), "median_ms_masks": round(1e3 * mm, 2),
              "time_ratio": round(mm / mp, 3),
              "mask_bytes_per_image": round(crop_bytes / n), "image_bytes_per_image": round(image_bytes / n),
              "full_bitmap_bytes_per_image": round(full_bytes / n),
              "dataset_extra_mb": round(masks_mem / 2**20, 2), "dataset_detection_mb": round(plain_mem / 2**20, 2)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
