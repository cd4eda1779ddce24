"""Does output-level distillation (msad/output_kd.py) pay? The controlled 3-seed table on the demo val.

Runs benchmarks/reproduce.py's rows for one teacher budget (the demo's 800 iterations by default): per seed one
teacher, its fused output, and every student of that seed distilled from that teacher, all 400 iterations:

  from the teacher's weights: student_nokd, student (feature distillation, the released recipe),
                              student_outputs (output distillation alone), student_both (feature + output)
  from scratch:               scratch_nokd, scratch (feature), scratch_outputs (output)
  light F28/1 students:       light_nokd, light (adapters' feature term), light_outputs (feature + output)

The output settings (--out-flags) were chosen on the tuning split (benchmarks/tune_distillation.py), never on
these val images. Writes benchmarks/results/output_kd.json ({"rows": {name: {"seeds": {"0": AP, ...}}},
"teacher_iters": N, "gains": ..., "gap_closed": ...}) and .md: paired gains over student_nokd (mean ± std over
seeds), and the share of the student-to-fused-teacher gap each row closes.

    python benchmarks/output_kd.py                 # ~80 min on a 2-core CPU VM; run nothing beside it
    python benchmarks/output_kd.py --resume-table  # after a failure: only the missing runs
    python benchmarks/output_kd.py --summarise runs/a/table,runs/b/table   # tables of reproduce.py runs made apart
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reproduce  # noqa: E402

# our row name -> reproduce.py's row
ROWS = {"teacher_fused": "teacher_fused", "student_nokd": "student_nokd", "student": "student",
        "student_outputs": "student_outputs", "student_both": "student_both", "scratch_nokd": "shift_scratch",
        "scratch": "kd_scratch", "scratch_outputs": "scratch_outputs", "light_nokd": "light_student_nokd",
        "light": "light_student", "light_outputs": "light_student_outputs"}
GAINS = {"student": "student_nokd", "student_outputs": "student_nokd", "student_both": "student_nokd",
         "scratch": "scratch_nokd", "scratch_outputs": "scratch_nokd", "light": "light_nokd",
         "light_outputs": "light"}


def summarise(runs: dict, teacher_iters: int) -> dict:
    """reproduce.py's runs {"table/row/seed": metrics} -> our rows, paired gains and gap closed."""
    rows = {}
    for name, row in ROWS.items():
        seeds = {key.split("/")[2]: m["AP"] for key, m in runs.items()
                 if key.split("/")[1] == row and key.split("/")[0] in ("shared", str(teacher_iters))}
        if seeds:
            rows[name] = {"seeds": dict(sorted(seeds.items())), "mean": round(statistics.mean(seeds.values()), 2),
                          "std": round(statistics.stdev(seeds.values()), 2) if len(seeds) > 1 else 0.0}
    paired = lambda a, b: [rows[a]["seeds"][s] - rows[b]["seeds"][s] for s in rows[a]["seeds"] if s in rows[b]["seeds"]]
    stats = lambda d: {"mean": round(statistics.mean(d), 2), "std": round(statistics.stdev(d), 2) if len(d) > 1 else 0.0,
                       "seeds": len(d)}
    gains = {f"{a} - {b}": stats(d) for a, b in GAINS.items() if a in rows and b in rows and (d := paired(a, b))}
    gap = {}
    if "teacher_fused" in rows and "student_nokd" in rows:
        for name in ("student", "student_outputs", "student_both"):
            if name in rows and (d := paired(name, "student_nokd")):
                g = paired("teacher_fused", "student_nokd")
                gap[name] = round(sum(d) / sum(g), 3) if sum(g) else None
    return {"rows": rows, "gains": gains, "gap_closed": gap, "teacher_iters": teacher_iters}


def markdown(result: dict, out_flags: str) -> str:
    r = result["rows"]
    lines = [f"Output distillation on the demo val (teacher {result['teacher_iters']} iterations, students 400; "
             f"output rows: `{out_flags}`); AP mean ± std over seeds {', '.join(next(iter(r.values()))['seeds'])}.",
             "", "| row | AP | AP per seed |", "|---|---|---|"]
    for name, row in r.items():
        lines.append(f"| `{name}` | {row['mean']:.2f} ± {row['std']:.2f} | "
                     + " / ".join(f"{v:.2f}" for v in row["seeds"].values()) + " |")
    lines += ["", "Paired gains (same seed, same teacher):", ""]
    lines += [f"* `{k}`: {g['mean']:+.2f} ± {g['std']:.2f} AP over {g['seeds']} seeds" for k, g in result["gains"].items()]
    lines += ["", "Share of the student-to-fused-teacher gap (`teacher_fused - student_nokd`) closed: "
              + ", ".join(f"`{k}` {v:.0%}" for k, v in result["gap_closed"].items() if v is not None)]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher-iters", type=int, default=800)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out-flags", default="--kd-outputs 3", help="train_student.py flags of the output rows")
    p.add_argument("--device", default="auto")
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--resume-table", action="store_true")
    p.add_argument("--out", default=os.path.join(reproduce.ROOT, "benchmarks", "results", "output_kd"))
    p.add_argument("--runs", default=os.path.join(reproduce.ROOT, "runs", "output_kd"))
    p.add_argument("--summarise", help="train nothing: merge these reproduce.py results (comma-separated, without .json)")
    args = p.parse_args(argv)
    runs_file = os.path.join(args.runs, "table")
    if args.summarise:
        return write(args, args.summarise.split(","))
    flags = ["--teacher-iters", args.teacher_iters, "--seeds", args.seeds, "--rows", ",".join(ROWS.values()),
             "--out-flags", args.out_flags, "--device", args.device, "--parallel", args.parallel,
             "--runs", args.runs, "--out", runs_file, *(["--resume-table"] if args.resume_table else [])]
    try:
        reproduce.main([str(f) for f in flags])
    finally:  # what finished is summarised even when a run failed
        write(args, [runs_file])


def write(args, tables: list) -> dict:
    """output_kd.json and .md from the runs of reproduce.py's result files `tables` (those that exist)."""
    runs = {}
    for table in tables:
        if os.path.exists(table + ".json"):
            with open(table + ".json") as f:
                runs |= json.load(f)["runs"]
    result = summarise(runs, args.teacher_iters) | {"out_flags": args.out_flags}
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(markdown(result, args.out_flags))
    print(json.dumps({"table": args.out + ".md", "gains": result["gains"]}))
    return result


if __name__ == "__main__":
    main()
