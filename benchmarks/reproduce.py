"""The paper's comparison (MSAD Table 1 / method.md Sec. 7) in miniature, on the built-in demo data.

One command trains every model with the same iteration budget and seed, evaluates each at its test
resolution, and writes one table (markdown + JSON) under benchmarks/results/:

  1. vanilla FCOS, trained and tested at the high resolution (P3..P7)
  2. vanilla FCOS, trained and tested at the low resolution (P3..P7)   - the naive low-res model
  3. vanilla multi-scale FCOS (both resolutions, P3..P7), tested at the low resolution
  4. the aligned teacher's LR branch alone, at the low resolution (aligned multi-scale training)
  5. the MSAD fused teacher (HR + LR)
  6. the MSAD student at the low resolution, and the same student trained with --kd-weight 0

    python benchmarks/reproduce.py                       # seeds 0 and 1, demo preset: 30 min on 2 CPU cores
    python benchmarks/reproduce.py --seeds 0 --iters 200 # quicker, noisier
Every run goes through train_teacher.py / train_student.py / evaluate.py exactly as a user runs them.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("AP", "AP50", "APs", "APm", "APl")


def run(script, *args, log):
    """Run one script as a user would; return its final JSON line."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    print("$", " ".join(cmd[1:]), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{script} failed (exit {proc.returncode}); see {log}")
    return json.loads(lines[-1])


def plan(args, out):
    """Rows of the table: (key, label, test resolution, list of (script, args))."""
    hr, lr = args.hr_sizes, [s // 2 for s in args.hr_sizes]
    hr_test, lr_test = args.hr_sizes[-1], args.hr_sizes[-1] // 2
    common = ["--iters", args.iters, "--seed", args.seed, "--device", args.device]
    common += ["--workers", args.workers] if args.workers is not None else []
    fmt = lambda sizes: ",".join(map(str, sizes))
    d = lambda name: os.path.join(out, name)
    teacher_ckpt = os.path.join(d("teacher"), "model_final.pth")
    student = ["train_student.py", *common, "--teacher", teacher_ckpt, "--no-eval"]
    return [
        ("fcos_hr", "1. FCOS, HR train / HR test", hr_test,
         [("train_teacher.py", [*common, "--mode", "single", "--train-sizes", fmt(hr), "--test-size", hr_test,
                                "--output-dir", d("fcos_hr")])]),
        ("fcos_lr", "2. FCOS, LR train / LR test (naive low-res)", lr_test,
         [("train_teacher.py", [*common, "--mode", "single", "--train-sizes", fmt(lr), "--test-size", lr_test,
                                "--max-size", args.max_size // 2, "--output-dir", d("fcos_lr")])]),
        ("fcos_ms", "3. FCOS, multi-scale train / LR test", lr_test,
         [("train_teacher.py", [*common, "--mode", "single", "--train-sizes", fmt(lr + hr), "--test-size", lr_test,
                                "--output-dir", d("fcos_ms")])]),
        ("teacher_lr", "4. aligned multi-scale teacher, LR branch / LR test", lr_test,
         [("train_teacher.py", [*common, "--train-sizes", fmt(hr), "--test-size", hr_test, "--no-eval",
                                "--output-dir", d("teacher")]),
          ("evaluate.py", ["--checkpoint", teacher_ckpt, "--branch", "lr", "--output-dir", d("teacher_lr")])]),
        ("teacher_fused", "5. MSAD teacher, fused (HR + LR input)", f"{hr_test}+{lr_test}",
         [("evaluate.py", ["--checkpoint", teacher_ckpt, "--branch", "fused", "--output-dir", d("teacher_fused")])]),
        ("student", "6. MSAD student (KD) / LR test", lr_test,
         [(student[0], [*student[1:], "--output-dir", d("student")]),
          ("evaluate.py", ["--checkpoint", os.path.join(d("student"), "model_final.pth"), "--output-dir",
                           d("student_eval")])]),
        ("student_nokd", "6b. same student, --kd-weight 0 / LR test", lr_test,
         [(student[0], [*student[1:], "--kd-weight", 0, "--output-dir", d("student_nokd")]),
          ("evaluate.py", ["--checkpoint", os.path.join(d("student_nokd"), "model_final.pth"), "--output-dir",
                           d("student_nokd_eval")])]),
    ]


def one_seed(args) -> dict:
    out = os.path.join(args.runs, f"seed{args.seed}")
    os.makedirs(out, exist_ok=True)
    rows = {}
    for key, label, test, steps in plan(args, out):
        t0 = time.time()
        for i, (script, script_args) in enumerate(steps):
            result = run(script, *script_args, log=os.path.join(out, f"{key}_{i}.log"))
        rows[key] = {"label": label, "test": test, **{m: result[m] for m in METRICS},
                     "wall_s": round(time.time() - t0, 1)}
        print(json.dumps({key: rows[key]}), flush=True)
    return rows


def table(results: dict) -> str:
    seeds = sorted(results)
    head = "| model | test px | " + " | ".join(f"{m} (seed {s})" if m == "AP" else m for s in seeds[:1]
                                                for m in METRICS) + "".join(f" | AP (seed {s})" for s in seeds[1:]) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for key, row in results[seeds[0]].items():
        cells = [row["label"], str(row["test"])] + [f"{row[m]:.1f}" for m in METRICS]
        cells += [f"{results[s][key]['AP']:.1f}" for s in seeds[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds; every model is trained once per seed")
    p.add_argument("--iters", type=int, default=400, help="the shared iteration budget of every training run "
                   "(the demo preset's; its lr steps stay at 300 and 370)")
    p.add_argument("--hr-sizes", default="224,240,256", help="HR training short sides; the last is the HR test size")
    p.add_argument("--max-size", type=int, default=400)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, help="data loader workers (default: the preset's)")
    p.add_argument("--runs", default=os.path.join(ROOT, "runs", "reproduce"))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "reproduce"))
    args = p.parse_args(argv)
    args.hr_sizes = [int(s) for s in args.hr_sizes.split(",")]
    results, t0 = {}, time.time()
    for seed in (int(s) for s in args.seeds.split(",")):
        args.seed = seed
        results[seed] = one_seed(args)
    md = table(results)
    print(md)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    meta = {"iters": args.iters, "hr_sizes": args.hr_sizes, "seeds": sorted(results), "wall_s": round(time.time() - t0)}
    with open(args.out + ".md", "w") as f:
        f.write(md + "\n\n" + json.dumps(meta) + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    print(json.dumps({"table": args.out + ".md", **meta}))


if __name__ == "__main__":
    main()
