"""The results table of benchmarks/reproduce.py: rows, per-seed metrics, mean ± std, gains, markdown."""
import json
import os
import statistics
import threading
import time

METRICS = ("AP", "AP50", "APs", "APm", "APl")
MASK_METRICS = tuple(f"mask_{m}" for m in ("AP", "AP50", "AP75", "APs", "APm", "APl"))  # a model with masks
KEEP = METRICS + MASK_METRICS + ("params_m", "gflops", "cff_weights", "diagnostics")
LABELS = {
    "fcos_hr": "FCOS, HR train / HR test",
    "fcos_lr": "FCOS, LR train / LR test (naive low-res)",
    "fcos_ms": "FCOS, multi-scale train / LR test",
    "shift_scratch": "student arch. (P2-P6 on the half image), scratch, no teacher",
    "kd_scratch": "same + distillation (scratch)",
    "teacher_lr": "MSAD teacher, LR branch",
    "teacher_fused": "MSAD teacher, fused (HR + LR)",
    "student": "MSAD student: teacher init + distillation",
    "student_nokd": "same, --kd-weight 0",
    "fcos_lr_2x": "naive LR FCOS, teacher + student budgets",
    "light_student": "light student (FPN {F}, {H} head conv(s)), scratch + distillation",
    "light_student_nokd": "same, --kd-weight 0",
    "student_outputs": "teacher init + output distillation alone",
    "student_both": "teacher init + feature and output distillation",
    "scratch_outputs": "student arch., scratch + output distillation alone",
    "light_student_outputs": "light student, scratch + feature and output distillation",
}
GAINS = {"distillation, from scratch": ("kd_scratch", "shift_scratch"),
         "distillation, teacher init": ("student", "student_nokd"),
         "pyramid shift": ("shift_scratch", "fcos_lr"),
         "student vs equal-compute naive LR": ("student", "fcos_lr_2x"),
         "distillation, light student": ("light_student", "light_student_nokd"),
         "light student vs naive LR": ("light_student", "fcos_lr"),
         "output distillation, teacher init": ("student_outputs", "student_nokd"),
         "feature + output distillation, teacher init": ("student_both", "student_nokd"),
         "output distillation, from scratch": ("scratch_outputs", "shift_scratch"),
         "output distillation added, light student": ("light_student_outputs", "light_student")}


class Table:
    """The results file: {"meta", "runs": {"table/row/seed": final metrics}}; rewritten after every run."""

    def __init__(self, args):
        self.args, self.lock, self.failed = args, threading.Lock(), []
        self.runs = {}
        if args.resume_table and os.path.exists(args.out + ".json"):
            with open(args.out + ".json") as f:
                self.runs = json.load(f).get("runs", {})

    def put(self, key: str, metrics: dict):
        with self.lock:
            self.runs[key] = metrics
            self.write()

    def rows(self, table: int) -> dict:
        """row -> {"seeds": {seed: metrics}, "mean": {...}, "std": {...}} for one teacher budget."""
        out = {}
        for key, m in self.runs.items():
            t, row, seed = key.split("/")
            if t in ("shared", str(table)) and row != "teacher":
                out.setdefault(row, {"seeds": {}})["seeds"][seed] = m
        for row in out.values():
            aps = {k: [m[k] for m in row["seeds"].values()] for k in METRICS}
            row["mean"] = {k: round(statistics.mean(v), 2) for k, v in aps.items()}
            row["std"] = {k: round(statistics.stdev(v), 2) if len(v) > 1 else 0.0 for k, v in aps.items()}
        return dict(sorted(out.items(), key=lambda kv: list(LABELS).index(kv[0])))

    def gains(self, rows: dict) -> dict:
        """Paired differences (same seed) of AP: mean, std over seeds, and the seeds used."""
        out = {}
        for name, (a, b) in GAINS.items():
            if a in rows and b in rows:
                seeds = sorted(set(rows[a]["seeds"]) & set(rows[b]["seeds"]))
                d = [rows[a]["seeds"][s]["AP"] - rows[b]["seeds"][s]["AP"] for s in seeds]
                if d:
                    out[name] = {"rows": f"{a} - {b}", "mean": round(statistics.mean(d), 2),
                                 "std": round(statistics.stdev(d), 2) if len(d) > 1 else 0.0, "seeds": len(d)}
        return out

    def write(self):
        a = self.args
        tables = {str(t): {"rows": (rows := self.rows(t)), "gains": self.gains(rows)} for t in a.teacher_iters}
        meta = {"iters": a.iters, "teacher_iters": a.teacher_iters, "hr_sizes": a.hr_sizes, "seeds": a.seeds,
                "device": a.device, "extra": a.extra, "wall_s": round(time.time() - a.t0)}
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        for path, text in ((a.out + ".json", json.dumps({"meta": meta, "tables": tables, "runs": self.runs}, indent=1)),
                           (a.out + ".md", markdown(tables, a) + "\n\n" + json.dumps(meta))):
            with open(path + ".tmp", "w") as f:
                f.write(text + "\n")
            os.replace(path + ".tmp", path)


def markdown(tables: dict, args) -> str:
    lines = []
    for t, table in tables.items():
        lines += [f"Teacher budget {t} iterations, other runs {args.iters}; AP mean ± std over seeds "
                  f"{','.join(map(str, args.seeds))}.", "",
                  "| row | model | AP | AP50 | APs | APm | APl | AP per seed |", "|---|---|---|---|---|---|---|---|"]
        for row, r in table["rows"].items():
            label = LABELS[row].format(F=args.light_fpn_channels, H=args.light_head_convs)
            cells = [f"{r['mean'][m]:.1f} ± {r['std'][m]:.1f}" if m == "AP" else f"{r['mean'][m]:.1f}" for m in METRICS]
            per_seed = " / ".join(f"{r['seeds'][s]['AP']:.1f}" for s in sorted(r["seeds"]))
            lines.append(f"| `{row}` | {label} | " + " | ".join(cells) + f" | {per_seed} |")
        lines += [""] + [f"* {name} (`{g['rows']}`): {g['mean']:+.1f} ± {g['std']:.1f} AP over {g['seeds']} seeds"
                         for name, g in table["gains"].items()]
        cff = [r["cff_weights"]["a_H"] for r in table["rows"].get("teacher_fused", {}).get("seeds", {}).values()
               if "cff_weights" in r]
        if cff:
            lines.append("* C-FF a_H per level position (P3/P2 ... P7/P6), mean over seeds: "
                         + ", ".join(f"{sum(v) / len(v):.2f}" for v in zip(*cff)))
        lines.append("")
    return "\n".join(lines)
