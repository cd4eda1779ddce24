"""What each part of MSAD buys (paper Table 1 and Sec. 4.2 ablations), as a controlled ablation on the demo data.

Every row is trained with the same data, schedule shape and seeds, and tested at its own resolution (HR:
the last --hr-sizes entry; LR: half of it). Rows (json keys):

  fcos_hr        vanilla FCOS on P3..P7, HR train and test
  fcos_lr        the naive LR detector: FCOS on P3..P7, LR train and test
  fcos_ms        vanilla multi-scale training (LR + HR sizes), LR test
  shift_scratch  the student architecture (P2..P6 on the half image), from scratch, no teacher: the pyramid shift
  kd_scratch     the same + distillation from the fused teacher: same init, same budget, distillation alone
  teacher_lr     the MSAD teacher's LR branch (aligned multi-scale training, Sec. 3.2), LR test
  teacher_fused  the MSAD teacher's fused output (C-FF, Sec. 3.3), HR + LR input
  student        the released recipe: initialised from the teacher, distilled (Sec. 3.4)
  student_nokd   the same with --kd-weight 0
  fcos_lr_2x     the naive LR detector given the teacher's and the student's budgets together (equal compute)
  light_student, light_student_nokd   a narrow student (--fpn-channels F --head-convs H, from scratch,
                 --clip-grad 5) with and without distillation
Output distillation (msad/output_kd.py, --out-flags), only when named in --rows (benchmarks/output_kd.py):
  student_outputs        teacher init, output distillation alone (--kd-weight 0)
  student_both           teacher init, feature + output distillation
  scratch_outputs        from scratch, output distillation alone
  light_student_outputs  the light student, feature (through its adapters) + output distillation

The teacher's budget is a parameter (--teacher-iters, a list: the first is the main table, every other one
repeats the teacher, its two outputs, kd_scratch, student and student_nokd). Rows that do not depend on it
are trained once per seed.
Every training run uses the demo preset with lr steps at 75% and 92.5% of its own budget.

    python benchmarks/reproduce.py               # 3 seeds, teachers 1200 and 400: 97 min on a 2-core CPU VM
    python benchmarks/reproduce.py --seeds 0 --teacher-iters 400 --iters 200     # the quick variant
    python benchmarks/reproduce.py --resume-table                          # after a failure: skip finished rows
    python benchmarks/reproduce.py --device cuda --parallel 14             # a GPU machine: 4 min on an H200

Each finished row is written to benchmarks/results/reproduce.{json,md} at once; a failed row is named
(row, seed, log file) and the others go on. Runs go through train_teacher.py, train_student.py and
evaluate.py exactly as a user runs them, one at a time (--parallel N for a GPU machine).
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

from reproduce_table import KEEP, LABELS, Table, markdown

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT_BUDGET_ROWS = ("teacher", "teacher_lr", "teacher_fused", "kd_scratch", "student", "student_nokd")
OUTPUT_KD_ROWS = ("student_outputs", "student_both", "scratch_outputs", "light_student_outputs")  # only on request


def add_run_args(p: argparse.ArgumentParser, runs: str, out: str) -> None:
    """The flags of every benchmark that trains through the scripts (this one and tune_distillation.py)."""
    p.add_argument("--device", default="auto")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (1 on CPU: torch processes slow each other)")
    p.add_argument("--extra", default="", help="flags added to every training run (e.g. a tiny model for a test)")
    p.add_argument("--runs", default=runs, help="run folders and their logs")
    p.add_argument("--out", default=out, help="results file")


def steps(iters: int) -> str:
    """The demo preset's lr steps (300 and 370 of 400), scaled to another budget."""
    return f"{round(iters * 0.75)},{round(iters * 0.925)}"


def plan(args, seed: int) -> list:
    """Jobs of one seed: (table, row, depends on, [(script, args)]). table None: shared by every teacher budget."""
    hr, lr = args.hr_sizes, [s // 2 for s in args.hr_sizes]
    hr_test, lr_test = hr[-1], hr[-1] // 2
    fmt = lambda sizes: ",".join(map(str, sizes))
    out = lambda name: os.path.join(args.runs, f"seed{seed}", name)
    base = ["--overwrite", "--seed", seed, "--device", args.device, *(["--workers", args.workers] if args.workers is not None else []),
            *args.extra.split()]
    budget = lambda n: ["--iters", n, "--steps", steps(n)]
    fcos = lambda name, n, *flags: ("train_teacher.py", [*base, *budget(n), "--mode", "single", *flags,
                                                         "--output-dir", out(name)])
    student = lambda name, *flags: ("train_student.py", [*base, *budget(args.iters), *flags, "--output-dir", out(name)])
    # No norm layer sits between a thin FPN and its predictions: from scratch at lr 0.02 it needs clipping.
    light = ["--fpn-channels", args.light_fpn_channels, "--head-convs", args.light_head_convs, "--init", "scratch",
             "--clip-grad", 5]
    outputs = args.out_flags.split()
    jobs = [
        (None, "fcos_hr", None, [fcos("fcos_hr", args.iters, "--train-sizes", fmt(hr), "--test-size", hr_test)]),
        (None, "fcos_lr", None, [fcos("fcos_lr", args.iters, "--train-sizes", fmt(lr), "--test-size", lr_test,
                                      "--max-size", args.max_size // 2)]),
        (None, "fcos_ms", None, [fcos("fcos_ms", args.iters, "--train-sizes", fmt(lr + hr), "--test-size", lr_test)]),
        (None, "shift_scratch", None, [student("shift_scratch", "--init", "scratch", "--kd-weight", 0)]),
        (None, "light_student_nokd", None, [student("light_student_nokd", *light, "--kd-weight", 0)]),
    ]
    for t in args.teacher_iters:  # budgets after the first: only the rows that show the dependence (CPU time)
        name = f"teacher{t}"
        ckpt = os.path.join(out(name), "model_final.pth")
        teacher = ["--teacher", ckpt]
        evaluate = lambda branch: ("evaluate.py", ["--checkpoint", ckpt, "--branch", branch, "--device", args.device,
                                                   "--output-dir", out(f"{name}_{branch}")])
        jobs += [
            (t, "teacher", None, [("train_teacher.py", [*base, *budget(t), "--train-sizes", fmt(hr), "--test-size",
                                                        hr_test, "--no-eval", "--output-dir", out(name)])]),
            (t, "teacher_lr", "teacher", [evaluate("lr")]),
            (t, "teacher_fused", "teacher", [evaluate("fused")]),
            (t, "kd_scratch", "teacher", [student(f"kd_scratch_t{t}", "--init", "scratch", *teacher)]),
            (t, "student", "teacher", [student(f"student_t{t}", *teacher)]),
            (t, "student_nokd", "teacher", [student(f"student_nokd_t{t}", *teacher, "--kd-weight", 0)]),
            (t, "fcos_lr_2x", None, [fcos(f"fcos_lr_2x_t{t}", t + args.iters, "--train-sizes", fmt(lr),
                                          "--test-size", lr_test, "--max-size", args.max_size // 2)]),
            (t, "light_student", "teacher", [student(f"light_student_t{t}", *light, *teacher)]),
            (t, "student_outputs", "teacher", [student(f"student_outputs_t{t}", *teacher, "--kd-weight", 0, *outputs)]),
            (t, "student_both", "teacher", [student(f"student_both_t{t}", *teacher, *outputs)]),
            (t, "scratch_outputs", "teacher", [student(f"scratch_outputs_t{t}", "--init", "scratch", *teacher,
                                                       "--kd-weight", 0, *outputs)]),
            (t, "light_student_outputs", "teacher", [student(f"light_student_outputs_t{t}", *light, *teacher,
                                                             *outputs)]),
        ]
    jobs = [j for j in jobs if j[1] not in OUTPUT_KD_ROWS or (args.rows and j[1] in args.rows)]
    jobs = [j for j in jobs if j[0] in (None, args.teacher_iters[0]) or j[1] in SHORT_BUDGET_ROWS]
    jobs = [j for j in jobs if not args.rows or j[1] in args.rows or (j[1] == "teacher" and any(
        dep == "teacher" and row in args.rows for _, row, dep, _ in jobs))]
    return jobs


def run_job(args, table: Table, key: str, steps_: list, log: str) -> bool:
    """Run one row's scripts in order; store the last script's final line under `key`. False on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if args.parallel > 1 else "")}
    env = {k: v for k, v in env.items() if v != ""}
    t0, result = time.time(), None
    for script, script_args in steps_:
        cmd = [sys.executable, os.path.join(ROOT, script), *map(str, script_args)]
        print(f"[{key}] $ {' '.join(cmd[1:])}", flush=True)
        with open(log, "a") as f:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True, env=env)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            row, seed = key.split("/")[1:]
            print(f"FAILED: row {row}, seed {seed}: {script} exit {proc.returncode}; log {log}", flush=True)
            table.failed.append(key)
            return False
        result = json.loads(lines[-1])
    metrics = {k: result[k] for k in KEEP if k in result} | {"wall_s": round(time.time() - t0, 1)}
    table.put(key, metrics)
    print(json.dumps({key: {m: metrics.get(m) for m in ("AP", "wall_s")}}), flush=True)
    return True


def execute(args, table: Table):
    """All jobs, `--parallel` at a time, each after the teacher it needs; finished keys are skipped."""
    slots, threads, done = threading.Semaphore(args.parallel), [], {}
    jobs = [(seed, *job) for seed in args.seeds for job in plan(args, seed)]
    if args.parallel > 1:  # the longest runs first: teachers, then the long naive LR runs, by budget
        jobs.sort(key=lambda j: (j[2] != "teacher", j[2] != "fcos_lr_2x", -(j[1] or 0)))
    for seed, t, row, dep, steps_ in jobs:
        key = f"{t or 'shared'}/{row}/{seed}"
        done[key] = threading.Event()
        dep_key = f"{t}/{dep}/{seed}" if dep else None

        def job(key=key, steps_=steps_, dep_key=dep_key, seed=seed):
            try:
                if dep_key:
                    done[dep_key].wait()
                    if dep_key not in table.runs:
                        print(f"SKIPPED: {key}: its teacher run failed", flush=True)
                        table.failed.append(key)
                        return
                if key in table.runs:
                    return  # --resume-table: finished earlier
                os.makedirs(os.path.join(args.runs, f"seed{seed}"), exist_ok=True)
                with slots:
                    run_job(args, table, key, steps_, os.path.join(args.runs, f"seed{seed}",
                                                                   key.replace("/", "_") + ".log"))
            finally:
                done[key].set()

        threads.append(threading.Thread(target=job, daemon=True))
    for th in threads:  # started in plan order, so with --parallel 1 runs follow the plan
        th.start()
        time.sleep(0.01)
    for th in threads:
        th.join()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; every row is trained once per seed")
    p.add_argument("--teacher-iters", default="1200,400",
                   help="teacher budgets; the first is the main table, the others repeat the teacher and students")
    p.add_argument("--iters", type=int, default=400, help="budget of every other training run (students, FCOS)")
    p.add_argument("--hr-sizes", default="224,240,256", help="HR training short sides; the last is the HR test size")
    p.add_argument("--max-size", type=int, default=400)
    p.add_argument("--light-fpn-channels", type=int, default=28,
                   help="FPN width F of the light student rows (28: the widest one-conv student whose evaluation "
                        "GFLOPs on the demo, 0.236, stay below the naive LR detector's, 0.247)")
    p.add_argument("--light-head-convs", type=int, default=1, help="convs per head tower of the light student rows")
    p.add_argument("--out-flags", default="--kd-outputs 3",
                   help="train_student.py flags of the output-distillation rows (chosen on the tuning split)")
    p.add_argument("--rows", help="only these rows (comma-separated json keys); default all")
    p.add_argument("--workers", type=int, help="data loader workers (default: the preset's)")
    p.add_argument("--resume-table", action="store_true", help="keep the rows already in --out.json, run the rest")
    add_run_args(p, os.path.join(ROOT, "runs", "reproduce"), os.path.join(ROOT, "benchmarks", "results", "reproduce"))
    args = p.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",")]
    args.seeds, args.teacher_iters, args.hr_sizes = ints(args.seeds), ints(args.teacher_iters), ints(args.hr_sizes)
    args.rows = set(args.rows.split(",")) if args.rows else None
    unknown = (args.rows or set()) - set(LABELS)
    if unknown:
        raise SystemExit(f"error: --rows: unknown rows {sorted(unknown)}; rows are {', '.join(LABELS)}")
    args.t0 = time.time()
    table = Table(args)
    execute(args, table)
    table.write()
    print(markdown({str(t): {"rows": (r := table.rows(t)), "gains": table.gains(r)} for t in args.teacher_iters}, args))
    wall = round(time.time() - args.t0)
    print(f"total time: {wall // 60} min {wall % 60} s")
    print(json.dumps({"table": args.out + ".md", "wall_s": wall, "failed": table.failed}))
    if table.failed:
        raise SystemExit(f"error: {len(table.failed)} runs failed or were skipped: {', '.join(table.failed)}; "
                         f"rerun with --resume-table to run only those")


if __name__ == "__main__":
    main()
