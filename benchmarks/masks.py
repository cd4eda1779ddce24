"""MSAD for instance segmentation on the demo: box and mask AP of MEInst models, 3 seeds (issue: MEInst mask branch).

Runs benchmarks/reproduce.py's rows for the demo's teacher budget (800 iterations; every other run 400), every
training run with `--mask-head meinst` (the student takes it from its teacher), and tests each at its own
resolution on the demo val:

  naive_lr        MEInst (FCOS + mask code) on P3..P7, trained and tested at the low resolution (reproduce: fcos_lr)
  naive_lr_equal  the same given the teacher's and the student's budgets together (fcos_lr_2x, equal compute)
  teacher_lr      the MSAD teacher's LR branch;  teacher_fused: its fused output (HR + LR input)
  student         teacher init + feature distillation (the released recipe);  student_nokd: --kd-weight 0

Beside each row, its box AP in the detection-only table of the same budgets and seeds (--detection-table), and
beside them all the ceiling the code puts on masks at this size: the mean IoU of decode(encode(mask)) with the mask,
on the val masks, of a basis fitted on the train masks (python -m msad.masks fit / iou).
Writes benchmarks/results/masks.json ({"rows": {name: {"seeds": {"0": {"AP", "mask_AP"}, ...}, "mean", "std"}},
"gains", "reconstruction_iou", ...}) and masks.md.

    python benchmarks/masks.py                  # ~75 min on a 2-core CPU VM; run nothing beside it
    python benchmarks/masks.py --resume-table   # after a failure: only the missing runs
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reproduce  # noqa: E402

ROWS = {"naive_lr": "fcos_lr", "naive_lr_equal": "fcos_lr_2x", "teacher_lr": "teacher_lr",
        "teacher_fused": "teacher_fused", "student": "student", "student_nokd": "student_nokd"}
GAINS = (("student", "naive_lr"), ("student", "naive_lr_equal"), ("student", "student_nokd"),
         ("teacher_fused", "student"))
METRICS = ("AP", "mask_AP", "mask_AP50", "mask_AP75", "mask_APs", "mask_APm", "mask_APl")


def summarise(runs: dict, teacher_iters: int) -> dict:
    """reproduce.py's runs {"table/row/seed": metrics} -> our rows (per seed, mean, std) and paired gains."""
    rows = {}
    for name, row in ROWS.items():
        seeds = {key.split("/")[2]: {k: m[k] for k in METRICS} for key, m in sorted(runs.items())
                 if key.split("/")[1] == row and key.split("/")[0] in ("shared", str(teacher_iters))}
        if seeds:
            per = {k: [s[k] for s in seeds.values()] for k in ("AP", "mask_AP")}
            rows[name] = {"seeds": seeds, "mean": {k: round(statistics.mean(v), 2) for k, v in per.items()},
                          "std": {k: round(statistics.stdev(v), 2) if len(v) > 1 else 0.0 for k, v in per.items()}}
    gains = {}
    for a, b in GAINS:
        if a in rows and b in rows:
            for metric in ("AP", "mask_AP"):
                d = [rows[a]["seeds"][s][metric] - rows[b]["seeds"][s][metric] for s in rows[a]["seeds"]
                     if s in rows[b]["seeds"]]
                gains.setdefault(f"{a} - {b}", {})[metric] = {
                    "mean": round(statistics.mean(d), 2), "std": round(statistics.stdev(d), 2) if len(d) > 1 else 0.0,
                    "seeds": len(d)}
    return {"rows": rows, "gains": gains, "teacher_iters": teacher_iters}


def box_ap_without_masks(result: dict, path: str) -> None:
    """Beside each row, the box AP of the same row in reproduce.py's detection-only table at the same teacher
    budget, seeds and budgets (`path`), and the paired difference: what the mask branch costs or buys the boxes."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        detection = json.load(f)["tables"].get(str(result["teacher_iters"]), {}).get("rows", {})
    for name, row in result["rows"].items():
        theirs = detection.get(ROWS[name], {}).get("seeds", {})
        d = [row["seeds"][s]["AP"] - theirs[s]["AP"] for s in row["seeds"] if s in theirs]
        if d:
            row["box_AP_without_masks"] = round(statistics.mean(theirs[s]["AP"] for s in row["seeds"] if s in theirs), 2)
            row["box_AP_change"] = {"mean": round(statistics.mean(d), 2),
                                    "std": round(statistics.stdev(d), 2) if len(d) > 1 else 0.0, "seeds": len(d)}
    result["detection_table"] = os.path.relpath(path, reproduce.ROOT)


def reconstruction_iou(data_root: str, out_dir: str) -> dict:
    """The code's ceiling: a basis fitted on the train masks, its mean round-trip IoU on the val masks."""
    ann = lambda split: os.path.join(data_root, "annotations", f"instances_{split}2017.json")
    codes = os.path.join(out_dir, "codes.pt")
    run = lambda *a: json.loads(subprocess.run([sys.executable, "-m", "msad.masks", *a], cwd=reproduce.ROOT, check=True,
                                               capture_output=True, text=True).stdout.strip().splitlines()[-1])
    fitted = run("fit", "--ann", ann("train"), "--out", codes)
    val = run("iou", "--codes", codes, "--ann", ann("val"))
    return {"train_masks": fitted["masks"], "val_masks": val["masks"], "dim": fitted["dim"], "mean_iou": val["mean_iou"]}


def markdown(result: dict) -> str:
    r = result["rows"]
    seeds = ", ".join(next(iter(r.values()))["seeds"]) if r else ""
    rec = result.get("reconstruction_iou") or {}
    lines = [f"MEInst masks on the demo val (teacher {result['teacher_iters']} iterations, every other run 400; every "
             f"model with `--mask-head meinst`); mean ± std over seeds {seeds}.", "",
             "| row | box AP | mask AP | mask AP50 | mask AP75 | mask AP per seed | box AP without masks (paired change) |",
             "|---|---|---|---|---|---|---|"]
    for name, row in r.items():
        mean = lambda k: statistics.mean(s[k] for s in row["seeds"].values())
        change = row.get("box_AP_change")
        lines.append(f"| `{name}` | {row['mean']['AP']:.2f} ± {row['std']['AP']:.2f} | {row['mean']['mask_AP']:.2f} ± "
                     f"{row['std']['mask_AP']:.2f} | {mean('mask_AP50'):.1f} | {mean('mask_AP75'):.1f} | "
                     + " / ".join(f"{s['mask_AP']:.2f}" for s in row["seeds"].values())
                     + (f" | {row['box_AP_without_masks']:.2f} ({change['mean']:+.2f} ± {change['std']:.2f}) |"
                        if change else " | |"))
    lines += ["", "Paired differences (same seed):", ""]
    lines += [f"* `{k}`: box {g['AP']['mean']:+.2f} ± {g['AP']['std']:.2f}, mask {g['mask_AP']['mean']:+.2f} ± "
              f"{g['mask_AP']['std']:.2f} AP over {g['mask_AP']['seeds']} seeds" for k, g in result["gains"].items()]
    if rec:
        lines += ["", f"The code's ceiling: {rec['dim']} components fitted on the {rec['train_masks']} train masks "
                      f"reconstruct the {rec['val_masks']} val masks (28 x 28, in their boxes) at mean IoU "
                      f"{rec['mean_iou']:.3f}."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-iters", type=int, default=800)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--device", default="auto")
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--resume-table", action="store_true")
    p.add_argument("--data-root", default=os.path.join(reproduce.ROOT, "data", "synthetic"))
    p.add_argument("--out", default=os.path.join(reproduce.ROOT, "benchmarks", "results", "masks"))
    p.add_argument("--runs", default=os.path.join(reproduce.ROOT, "runs", "masks"))
    p.add_argument("--detection-table", default=os.path.join(reproduce.ROOT, "benchmarks", "results", "reproduce_t800.json"),
                   help="reproduce.py's detection-only results at the same budgets: the box AP without masks")
    args = p.parse_args(argv)
    table = os.path.join(args.runs, "table")
    flags = ["--teacher-iters", args.teacher_iters, "--seeds", args.seeds, "--rows", ",".join(ROWS.values()),
             "--extra", "--mask-head meinst", "--device", args.device, "--parallel", args.parallel, "--runs", args.runs,
             "--out", table, *(["--resume-table"] if args.resume_table else [])]
    try:
        reproduce.main([str(f) for f in flags])
    finally:  # what finished is summarised even when a run failed
        with open(table + ".json") as f:
            result = summarise(json.load(f)["runs"], args.teacher_iters)
        box_ap_without_masks(result, args.detection_table)
        result["reconstruction_iou"] = reconstruction_iou(args.data_root, args.runs)
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(markdown(result))
        print(json.dumps({"table": args.out + ".md", "gains": result["gains"]}))


if __name__ == "__main__":
    main()
