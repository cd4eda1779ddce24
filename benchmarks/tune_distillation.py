"""How the demo's distillation settings were chosen: a grid over the allowed levers, on a tuning split.

The tuning split is generated with another seed than the demo data (`--data`, default data/synthetic_tune,
seed 1), so no constant is chosen on the demo's validation images. For each teacher budget, C-FF hidden
width and seed, it trains a teacher, evaluates its fused output (with the C-FF weights) and its LR branch,
then trains students from the teacher's weights and from scratch, without distillation and with each
distillation setting. `--students` adds light students (lightFxH: FPN width F, H head convs, from scratch),
trained without distillation and with the first setting, next to the naive LR detector (fcos_lr) they are
measured against. Runs go through the scripts as a user runs them; `--parallel` runs several at once
(meant for a GPU machine: on 2 CPU cores use 1). Each finished run is added to `--out` at once, so a run
cut short keeps what finished.

    python benchmarks/tune_distillation.py --device cuda --parallel 14 --out runs/tune/sweep.json
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reproduce import ROOT, add_run_args, steps  # noqa: E402  (the lr steps scaled to a budget, as in the table)
sys.path.insert(0, ROOT)
from msad.cli import PRESETS  # noqa: E402

# name -> train_student.py flags; "w" weight, "wu" warm-up, l1/l2 distance, "lv" per-level normalisation
KD = {
    "released": ["--kd-weight", 0.6, "--kd-warmup", 500],
    "w0.6": ["--kd-weight", 0.6, "--kd-warmup", 100],
    "w2": ["--kd-weight", 2, "--kd-warmup", 100],
    "w6": ["--kd-weight", 6, "--kd-warmup", 100],
    "w20": ["--kd-weight", 20, "--kd-warmup", 100],
    "lv1": ["--kd-weight", 1, "--kd-warmup", 100, "--kd-norm", "level"],
    "l2w2": ["--kd-weight", 2, "--kd-warmup", 100, "--kd-loss", "l2"],
    "w0.2": ["--kd-weight", 0.2, "--kd-warmup", 100],
    "l2w0.2": ["--kd-weight", 0.2, "--kd-warmup", 100, "--kd-loss", "l2"],
    # output distillation (msad/output_kd.py) alone: "o" weight, "g" focal gamma, "c" with the centre-ness term
    "o0.3": ["--kd-weight", 0, "--kd-outputs", 0.3, "--kd-warmup", 100],
    "o1": ["--kd-weight", 0, "--kd-outputs", 1, "--kd-warmup", 100],
    "o1cls": ["--kd-weight", 0, "--kd-outputs", 1, "--kd-output-terms", "cls", "--kd-warmup", 100],
    "o1box": ["--kd-weight", 0, "--kd-outputs", 1, "--kd-output-terms", "box", "--kd-warmup", 100],
    "o3": ["--kd-weight", 0, "--kd-outputs", 3, "--kd-warmup", 100],
    "o10": ["--kd-weight", 0, "--kd-outputs", 10, "--kd-warmup", 100],
    "o3g2": ["--kd-weight", 0, "--kd-outputs", 3, "--kd-gamma", 2, "--kd-warmup", 100],
    "o10g2": ["--kd-weight", 0, "--kd-outputs", 10, "--kd-gamma", 2, "--kd-warmup", 100],
    "o3c": ["--kd-weight", 0, "--kd-outputs", 3, "--kd-output-terms", "cls,box,ctr", "--kd-warmup", 100],
    # feature (the demo's w2) + output distillation
    "w2o3": ["--kd-weight", 2, "--kd-outputs", 3, "--kd-warmup", 100],
}


def student_flags(name: str) -> list:
    """Student variants: "teacher" / "scratch" (the init), or "lightFxH": FPN width F, H head convs, from scratch,
    with the gradient clipping the light rows of reproduce.py use."""
    if name in ("teacher", "scratch"):
        return ["--init", name]
    if name.startswith("light") and "x" in name:
        f, h = name[5:].split("x")
        return ["--init", "scratch", "--fpn-channels", int(f), "--head-convs", int(h), "--clip-grad", 5]
    raise SystemExit(f"error: --students: unknown variant {name!r}; use teacher, scratch or lightFxH (light16x1)")
KEEP = ("AP", "AP50", "APs", "APm", "APl", "cff_weights", "diagnostics", "time_s", "iterations")


class Sweep:
    def __init__(self, args):
        self.args, self.results, self.lock = args, {}, threading.Lock()
        self.slots = threading.Semaphore(args.parallel)
        self.done = {}  # job name -> Event
        self.deadline = time.time() + args.deadline_s

    def run(self, name, cmd, log):
        env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if self.args.parallel > 1 else {})}  # one run: every core
        with open(log, "w") as f:
            proc = subprocess.run([sys.executable, *map(str, cmd)], cwd=ROOT, stdout=subprocess.PIPE, stderr=f,
                                  text=True, env=env)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            with open(log) as f:
                tail = f.read()[-600:]
            raise RuntimeError(f"{name}: exit {proc.returncode}, see {log}: {tail}")
        return json.loads(lines[-1])

    def job(self, name, deps, steps_):
        """Wait for `deps`, take a slot, run each (key, script + args); record every final line under name/key."""
        for d in deps:
            self.done[d].wait()
        ok = all(self.results.get(d, {}).get("ok") for d in deps)
        record = {"ok": False}
        with self.slots:
            if not ok or time.time() > self.deadline:
                record["skipped"] = "dependency failed" if not ok else "deadline"
            else:
                t0 = time.time()
                try:
                    for key, cmd in steps_:
                        out = self.run(f"{name}/{key}", cmd, os.path.join(self.args.logs, f"{name}.{key}.log"))
                        record[key] = {k: out[k] for k in KEEP if k in out}
                    record["ok"] = True
                except Exception as e:  # one failed run must not stop the sweep
                    record["error"] = str(e)
                record["wall_s"] = round(time.time() - t0, 1)
        with self.lock:
            self.results[name] = record
            tmp = self.args.out + ".tmp"
            with open(tmp, "w") as f:
                json.dump({"meta": vars(self.args), "results": self.results}, f, indent=1)
            os.replace(tmp, self.args.out)
            print(json.dumps({name: {k: v.get("AP") if isinstance(v, dict) else v for k, v in record.items()}}),
                  flush=True)
        self.done[name].set()

    def plan(self):
        a, jobs = self.args, []
        data = ["--train-ann", f"{a.data}/annotations/instances_train2017.json", "--train-images", f"{a.data}/train2017",
                "--val-ann", f"{a.data}/annotations/instances_val2017.json", "--val-images", f"{a.data}/val2017"]
        common = [*data, "--device", a.device, *a.extra.split()]
        runs = lambda name: os.path.join(a.runs, name)
        for seed in a.seeds:
            for t_iters in a.teacher_iters:
                for hidden in a.cff_hidden:
                    t = f"t{t_iters}_h{hidden}_s{seed}"
                    ckpt = os.path.join(runs(t), "model_final.pth")
                    jobs.append((t, [], [
                        ("train", ["train_teacher.py", *common, "--seed", seed, "--iters", t_iters, "--steps",
                                   steps(t_iters), "--cff-hidden", hidden, "--no-eval", "--output-dir", runs(t)]),
                        ("fused", ["evaluate.py", "--checkpoint", ckpt, "--branch", "fused", *data, "--device",
                                   a.device, "--output-dir", runs(t + "_fused")]),
                        ("lr", ["evaluate.py", "--checkpoint", ckpt, "--branch", "lr", *data, "--device", a.device,
                                "--output-dir", runs(t + "_lr")])]))
        student = lambda seed: ["train_student.py", *common, "--seed", seed, "--iters", a.student_iters,
                                "--steps", steps(a.student_iters)]
        demo = PRESETS["demo"]["common"]  # the teachers' sizes; the naive LR detector gets their halves
        half = ",".join(str(s // 2) for s in demo["train_sizes"])
        for seed in a.seeds:  # the naive LR detector, the baseline of the light students (fcos_lr in the table)
            jobs.append((f"fcos_lr_s{seed}", [], [("train", [
                "train_teacher.py", *common, "--seed", seed, "--iters", a.student_iters, "--steps",
                steps(a.student_iters), "--mode", "single", "--train-sizes", half, "--test-size",
                demo["test_size"] // 2, "--max-size", demo["max_size"] // 2,
                "--output-dir", runs(f"fcos_lr_s{seed}")])]))
        for kd in ["nokd", *a.kd]:
            for seed in a.seeds:
                for t_iters in a.teacher_iters:
                    for hidden in a.cff_hidden:
                        t = f"t{t_iters}_h{hidden}_s{seed}"
                        flags = ["--kd-weight", 0] if kd == "nokd" else KD[kd]
                        for variant in a.students:
                            scratch = "scratch" in student_flags(variant)
                            if kd == "nokd" and scratch and (t_iters, hidden) != (a.teacher_iters[0], a.cff_hidden[0]):
                                continue  # a student from scratch without a teacher: once per seed
                            if variant.startswith("light") and kd not in ("nokd", a.kd[0]):
                                continue  # light students: without distillation and with the first setting only
                            name = f"{t}_{variant}_{kd}"
                            needs_teacher = not (kd == "nokd" and scratch)  # else it can run while teachers train
                            teacher = ["--teacher", os.path.join(runs(t), "model_final.pth")] if needs_teacher else []
                            cmd = [*student(seed), *student_flags(variant), *flags, *teacher,
                                   "--output-dir", runs(name)]
                            jobs.append((name, [t] if needs_teacher else [], [("train", cmd)]))
        return jobs

    def start(self):
        jobs = self.plan()
        for name, _, _ in jobs:
            self.done[name] = threading.Event()
        threads = [threading.Thread(target=self.job, args=j, daemon=True) for j in jobs]
        for th in threads:
            th.start()
            time.sleep(0.01)  # keep the semaphore's FIFO order close to the plan's priority order
        for th in threads:
            th.join()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(ROOT, "data", "synthetic_tune"),
                   help="tuning split (generate: python -m msad.synthetic --root data/synthetic_tune --seed 1)")
    p.add_argument("--teacher-iters", default="1600,400")
    p.add_argument("--cff-hidden", default="16,0", help="C-FF hidden widths (0: FPN width / 8)")
    p.add_argument("--student-iters", type=int, default=400)
    p.add_argument("--kd", default=",".join(KD), help=f"distillation settings among {list(KD)}")
    p.add_argument("--students", default="teacher,scratch",
                   help="student variants: teacher (init), scratch, lightFxH (FPN F, H head convs, from scratch; "
                        "trained without distillation and with the first --kd setting only)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--deadline-s", type=float, default=1e9, help="start no run after this many seconds")
    add_run_args(p, os.path.join(ROOT, "runs", "tune"), os.path.join(ROOT, "runs", "tune", "sweep.json"))
    args = p.parse_args(argv)
    ints = lambda s: [int(v) for v in s.split(",")]
    args.teacher_iters, args.cff_hidden, args.seeds = ints(args.teacher_iters), ints(args.cff_hidden), ints(args.seeds)
    args.kd, args.students = args.kd.split(","), args.students.split(",")
    for name in args.students:
        student_flags(name)  # an unknown variant fails here, before any run
    args.logs = os.path.join(args.runs, "logs")
    os.makedirs(args.logs, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    t0 = time.time()
    Sweep(args).start()
    print(json.dumps({"sweep": args.out, "wall_s": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main()
