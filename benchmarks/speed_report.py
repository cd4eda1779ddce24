"""Markdown tables of a benchmarks/speed.py result."""


def fmt_ms(s):
    return f"{s * 1e3:.1f}" if s < 10 else f"{s * 1e3:.0f}"


def markdown(r) -> str:
    """The results as markdown: the comparisons (unless --cost-only), the cost table, training throughput."""
    c, m = r["config"], r["machine"]
    B, (H, W) = c["batch"], c["size"]
    dev = m.get("gpu", m["cpu"])
    lines = [
        f"# Speed ({m['device']}: {dev}, {m['threads']} threads, torch {m['torch']}, torchvision {m['torchvision']})",
        "",
        f"Code: {r.get('commit', 'unknown')}. `python benchmarks/speed.py --device {m['device']}"
        f"{' --amp ' + c['amp'] if c['amp'] != 'none' else ''}{' --cost-only' if 'train' not in r else ''}`.",
        "",
        f"Batch {B} at {H}x{W}, {c['boxes']} GT boxes per image, amp {c['amp']}, channels_last "
        f"{c['channels_last']}; median of {c['repeats']} interleaved rounds after {c['warmup']} warm-up. "
        "Times in ms. Ratio = torchvision / ours (> 1: ours faster). Inference uses a dense head (every "
        "location passes the score threshold, 1000 candidates per level reach NMS), the worst case for decoding.",
        "",
    ]
    if "train" in r:
        lines += markdown_comparisons(r)
    lines += markdown_cost(r)
    if "train" in r:
        lines += ["## Training throughput", "", "| | images/s |", "|---|---|"]
        for key, name in (("ours_fcos", "FCOS (HR)"), ("torchvision_fcos", "torchvision FCOS (HR)"),
                          ("ours_teacher", "MSAD teacher"),
                          ("ours_student_with_teacher", "MSAD student (incl. frozen teacher forward)"),
                          ("ours_student_with_teacher_outputs", "MSAD student + output distillation (teacher head too)")):
            if key in r["train"]["images_per_second"]:  # results written before output distillation lack it
                lines.append(f"| {name} | {r['train']['images_per_second'][key]:.2f} |")
        if "student_outputs_kd_over_feature_kd" in r["train"]:
            lines += ["", f"Student step with output distillation / with feature distillation alone: "
                          f"{r['train']['student_outputs_kd_over_feature_kd']:.3f}."]
    lines += ["", f"Total benchmark time {r['total_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def markdown_comparisons(r) -> list:
    """Sections 1-4: ours vs torchvision, and the teacher iteration vs the FCOS iteration."""
    inf, tr, loss = r["inference"], r["train"], r["loss_targets"]
    gf = lambda f: f"{f / 1e9:.0f}"  # noqa: E731
    lines = [
        "| what | ours | torchvision | ratio |",
        "|---|---|---|---|",
        f"| train step (fwd + bwd + SGD), R50 FCOS | {fmt_ms(tr['seconds']['ours_fcos'])} | "
        f"{fmt_ms(tr['seconds']['torchvision_fcos'])} | {tr['torchvision_over_ours']:.2f} |",
        f"| inference (fwd + decode + NMS), dense head | {fmt_ms(inf['seconds']['ours_hr'])} | "
        f"{fmt_ms(inf['seconds']['torchvision_hr'])} | {inf['torchvision_over_ours']:.2f} |",
        f"| loss + targets, forward ({loss['locations']} locations) | {fmt_ms(loss['forward_seconds']['ours'])} | "
        f"{fmt_ms(loss['forward_seconds']['torchvision'])} | {loss['forward_torchvision_over_ours']:.2f} |",
        f"| loss + targets, forward + backward | {fmt_ms(loss['forward_backward_seconds']['ours'])} | "
        f"{fmt_ms(loss['forward_backward_seconds']['torchvision'])} | "
        f"{loss['forward_backward_torchvision_over_ours']:.2f} |",
        "",
        f"Same detections (labels, scores and boxes) as torchvision with copied weights (fp32), once its "
        f"locations get the half-stride offset: {inf['same_detections_as_torchvision']} "
        f"({inf['detections_per_image']} per image)."
        + ("" if tr["host_device_syncs_per_step"]["ours_fcos"] is None else
           " Host-device syncs per train step (CUDA sync debug mode): ours {ours_fcos}, torchvision "
           "{torchvision_fcos}, teacher {ours_teacher}.".format(**tr["host_device_syncs_per_step"])),
        "",
        "## Teacher iteration vs HR-only FCOS iteration",
        "",
        "| | time (ms) | images/s | train GFLOPs (fwd+bwd): backbone / FPN / fusion / head = total |",
        "|---|---|---|---|",
    ]
    tf = r["train_flops"]
    for name, key, fl in (("FCOS (HR, P3-P7)", "ours_fcos", tf["fcos"]), ("MSAD teacher (HR + LR + fused)",
                                                                          "ours_teacher", tf["teacher"])):
        lines.append(f"| {name} | {fmt_ms(tr['seconds'][key])} | {tr['images_per_second'][key]:.2f} | "
                     f"{gf(fl['backbone'])} / {gf(fl['fpn'])} / {gf(fl.get('fusion', 0))} / {gf(fl['head'])} "
                     f"= {gf(fl['total'])} |")
    lines += [
        "",
        f"Teacher / FCOS: time {tr['teacher_over_fcos']:.2f}x, FLOPs {tf['teacher_over_fcos']:.2f}x. "
        "The teacher runs the shared head on three pyramids of the HR grid (HR, LR, fused), so its head "
        f"alone costs {tf['teacher']['head'] / tf['fcos']['head']:.1f}x the FCOS head and "
        f"{tf['teacher']['head'] / tf['fcos']['total']:.2f}x the whole FCOS step: where the step is compute-bound "
        "(CPU, or a GPU kept busy) no implementation of this method gets the teacher under that. A GPU step "
        "bound by kernel launches (small batch) hides part of the extra work, since the teacher runs its three "
        "heads as one batched call.",
        "",
    ]
    return lines


def markdown_cost(r) -> list:
    """Section 5: latency, params and FLOPs of the HR model, the naive LR model and the students."""
    B, inf = r["config"]["batch"], r["inference"]
    gf = lambda f: f"{f / 1e9:.0f}"  # noqa: E731
    hr_total = r["models"]["hr_fcos"]["flops_inference"]["total"]
    lines = [
        "## Inference latency, params and FLOPs (backbone / FPN / head)",
        "",
        f"| model | input | levels | head grid (P_first) | latency (ms, batch {B}) | params (M) | "
        "GFLOPs backbone / FPN / head = total | GFLOPs / HR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {"hr_fcos": "HR FCOS", "naive_lr_fcos": "naive LR FCOS", "msad_student": "MSAD student"}
    for key, v in r["models"].items():
        name = names.get(key) or f"light student, FPN {v['fpn_channels']}, {v['head_convs']} head convs"
        p, f = v["params"], v["flops_inference"]
        lines.append(f"| {name} | {v['input'][0]}x{v['input'][1]} | P{v['levels'][0]}-P{v['levels'][-1]} | "
                     f"{v['head_grid'][0][0]}x{v['head_grid'][0][1]} | {fmt_ms(v['latency_s'])} | "
                     f"{p['total'] / 1e6:.1f} | {gf(f['backbone'])} / {gf(f['fpn'])} / {gf(f['head'])} = "
                     f"{gf(f['total'])} | {f['total'] / hr_total:.2f} |")
    lines += [
        "",
        f"FLOPs are for the batch of {B} (FlopCounterMode: 2 per multiply-add). The student's head runs on the "
        "same grid as the HR model's (its P2 is the HR P3 grid), so only its backbone is ~4x cheaper. The light "
        "students (`train_student.py --fpn-channels F --head-convs N`) thin that FPN and head.",
        "",
    ]
    return lines
