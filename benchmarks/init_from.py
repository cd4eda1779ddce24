"""Does starting the MSAD teacher from a trained HR detector (train_teacher.py --init-from) save training?

On COCO the detector would be a public one (torchvision's or AdelaiDet's FCOS, python -m msad.convert); on the
demo, a stand-in is trained here: a demo HR FCOS (--mode single). Then, per seed, with the demo preset and lr
steps at 75% / 92.5% of each run's budget:

  stand_in          HR FCOS on P3..P7, --detector-iters (HR test)
  teacher_init      MSAD teacher --init-from the stand-in, --teacher-iters
  teacher_scratch   MSAD teacher from scratch, the same teacher budget
  teacher_total     MSAD teacher from scratch, the stand-in's and the teacher's budgets together (same total
                    iterations; a teacher iteration costs about twice a detector's, so more compute)

Each teacher is scored on its fused branch (evaluate.py --branch fused), the way the paper reports it.

    python benchmarks/init_from.py                    # 3 seeds, 800 + 400 iterations: ~35 min on 2 CPU cores
    python benchmarks/init_from.py --seeds 0 --detector-iters 100 --teacher-iters 50   # a smoke run
"""
import argparse
import json
import os
import statistics
import sys
import time

from reproduce import ROOT, add_run_args, run_job, steps

ROWS = ("stand_in", "teacher_init", "teacher_scratch", "teacher_total")


class Results:
    """{row/seed: final metrics}, rewritten to --out.json after every run (the interface run_job writes to)."""

    def __init__(self, path: str):
        self.path, self.runs, self.failed = path, {}, []

    def put(self, key: str, metrics: dict):
        self.runs[key] = metrics
        with open(self.path + ".json", "w") as f:
            json.dump({"runs": self.runs}, f, indent=1)


def jobs(args, seed: int) -> list:
    out = lambda name: os.path.join(args.runs, f"seed{seed}", name)
    base = ["--overwrite", "--seed", seed, "--device", args.device, *args.extra.split()]
    budget = lambda n: ["--iters", n, "--steps", steps(n)]
    fused = lambda name: ("evaluate.py", ["--checkpoint", os.path.join(out(name), "model_final.pth"), "--branch",
                                          "fused", "--device", args.device, "--output-dir", out(name + "_fused")])
    teacher = lambda name, n, *flags: [("train_teacher.py", [*base, *budget(n), "--no-eval", *flags,
                                                             "--output-dir", out(name)]), fused(name)]
    detector = os.path.join(out("stand_in"), "model_final.pth")
    return [("stand_in", [("train_teacher.py", [*base, *budget(args.detector_iters), "--mode", "single",
                                                "--output-dir", out("stand_in")])]),
            ("teacher_init", teacher("teacher_init", args.teacher_iters, "--init-from", detector)),
            ("teacher_scratch", teacher("teacher_scratch", args.teacher_iters)),
            ("teacher_total", teacher("teacher_total", args.detector_iters + args.teacher_iters))]


def summary(results: Results, seeds) -> dict:
    """row -> AP per seed, mean and std; and the paired differences that answer the question."""
    ap = {row: [results.runs[f"x/{row}/{s}"]["AP"] for s in seeds if f"x/{row}/{s}" in results.runs] for row in ROWS}
    stat = lambda v: {"mean": round(statistics.mean(v), 2), "std": round(statistics.stdev(v), 2) if len(v) > 1 else 0.0}
    rows = {row: {"per_seed": v, **stat(v)} for row, v in ap.items() if v}
    diffs = {}
    for name, (a, b) in {"init - scratch (same teacher budget)": ("teacher_init", "teacher_scratch"),
                         "init - scratch (same total iterations)": ("teacher_init", "teacher_total")}.items():
        if len(ap[a]) == len(ap[b]) == len(seeds):
            d = [round(x - y, 2) for x, y in zip(ap[a], ap[b])]
            diffs[name] = {"per_seed": d, **stat(d)}
    return {"rows": rows, "differences": diffs}


def markdown(s: dict, args, wall: float) -> str:
    lines = [f"# Teacher from a trained HR detector (--init-from) vs from scratch, demo data, seeds {args.seeds_text}",
             "", f"`python benchmarks/init_from.py {' '.join(args.argv)}`: {wall / 60:.0f} min. Detector "
             f"{args.detector_iters} iterations, teachers {args.teacher_iters} (`teacher_total`: "
             f"{args.detector_iters + args.teacher_iters}). AP of the HR test for `stand_in`, of the fused branch "
             "for the teachers.", "", "| row | AP (mean ± std) | per seed |", "|---|---|---|"]
    lines += [f"| `{row}` | {r['mean']} ± {r['std']} | {' / '.join(map(str, r['per_seed']))} |"
              for row, r in s["rows"].items()]
    lines += ["", "| paired by seed | AP difference | per seed |", "|---|---|---|"]
    lines += [f"| {name} | {d['mean']:+} ± {d['std']} | {' / '.join(f'{x:+}' for x in d['per_seed'])} |"
              for name, d in s["differences"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--detector-iters", type=int, default=800, help="the stand-in HR detector's budget")
    p.add_argument("--teacher-iters", type=int, default=400, help="the teacher's budget after --init-from")
    add_run_args(p, os.path.join(ROOT, "runs", "init_from"), os.path.join(ROOT, "benchmarks", "results", "init_from"))
    args = p.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    args.seeds_text, args.seeds = args.seeds, [int(s) for s in args.seeds.split(",")]
    results, t0 = Results(args.out), time.time()
    for seed in args.seeds:  # one run at a time (--parallel is not used here)
        os.makedirs(os.path.join(args.runs, f"seed{seed}"), exist_ok=True)
        for row, steps_ in jobs(args, seed):
            run_job(args, results, f"x/{row}/{seed}", steps_, os.path.join(args.runs, f"seed{seed}", f"{row}.log"))
    s = summary(results, args.seeds)
    with open(args.out + ".json", "w") as f:
        json.dump({"runs": results.runs, "summary": s, "argv": args.argv}, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(s, args, time.time() - t0))
    print(markdown(s, args, time.time() - t0))
    print(json.dumps({"table": args.out + ".md", "wall_s": round(time.time() - t0), "failed": results.failed}))


if __name__ == "__main__":
    main()
