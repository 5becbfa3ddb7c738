#!/usr/bin/env python3
"""Short summary of a scripts/gpu_check.sh run (printed last).

Usage: gpu_summary.py <log dir>
Reads <dir>/gate.log (CuPy gate), <dir>/tests.log (Rust GPU tests), <dir>/bench.log (Rust bench,
BENCH_JSON lines) and <dir>/torch.log (PyTorch baselines, TORCH_JSON lines); prints our op next to
torchvision.ops.deform_conv2d and the grid_sample formulation, the network throughput, and one
verdict line per stage. Missing logs are reported, not fatal.
"""
import json
import os
import re
import sys


def read(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def json_lines(text, tag):
    rows = []
    for line in (text or "").splitlines():
        if line.startswith(tag + " "):
            try:
                rows.append(json.loads(line[len(tag) + 1:]))
            except json.JSONDecodeError:
                pass
    return rows


def fmt(v, width=9, digits=4):
    return f"{v:>{width}.{digits}f}" if isinstance(v, (int, float)) else f"{'-':>{width}}"


def main(d):
    gate, tests, bench, torch_log = (read(os.path.join(d, f)) for f in ("gate.log", "tests.log", "bench.log", "torch.log"))
    verdicts = []
    if gate is None:
        verdicts.append("CuPy gate: not run")
    else:
        m = re.search(r"CUPY_GATE runs=(\d+) failures=(\d+)", gate)
        verdicts.append(f"CuPy gate: {'PASS' if m and m.group(2) == '0' else 'FAIL'}"
                        + (f" ({m.group(1)} kernel runs, {m.group(2)} failures)" if m else " (no result line)"))
    if tests is None:
        verdicts.append("Rust GPU tests: not run")
    else:
        res = re.findall(r"test result: (\w+)\. (\d+) passed; (\d+) failed", tests)
        skipped = "SKIP: no CUDA device" in tests
        if res:
            passed = sum(int(r[1]) for r in res)
            failed = sum(int(r[2]) for r in res)
            ok = all(r[0] == "ok" for r in res) and not skipped
            verdicts.append(f"Rust GPU tests: {'PASS' if ok else 'FAIL'} ({passed} passed, {failed} failed"
                            + (", SKIPPED: no CUDA device seen" if skipped else "") + ")")
        else:
            verdicts.append("Rust GPU tests: FAIL (no test result line; see tests.log)")

    ours = {(r["label"], r["n"], r["dtype"]): r for r in json_lines(bench, "BENCH_JSON") if r.get("kind") == "op"}
    theirs = {(r["label"], r["n"], r["dtype"]): r for r in json_lines(torch_log, "TORCH_JSON")}
    models = [r for r in json_lines(bench, "BENCH_JSON") if r.get("kind") == "model"]

    print("\n== DCNv3 core op: ours vs PyTorch baselines (median ms; same GPU, same run)")
    print(f"{'shape':<22} {'N':>3} {'dtype':<5} {'ours fwd':>9} {'tv fwd':>9} {'gs fwd':>9} {'tv/ours':>8}"
          f" {'ours bwd':>9} {'tv f+b':>9} {'gs f+b':>9}")
    speedups = []
    for key in sorted(set(ours) | set(theirs), key=lambda k: (k[2], k[1], k[0])):
        o, t = ours.get(key, {}), theirs.get(key, {})
        ratio = None
        if isinstance(o.get("fwd_ms"), (int, float)) and isinstance(t.get("tv_fwd_ms"), (int, float)) and o["fwd_ms"] > 0:
            ratio = t["tv_fwd_ms"] / o["fwd_ms"]
            speedups.append((key, ratio))
        print(f"{key[0]:<22} {key[1]:>3} {key[2]:<5} {fmt(o.get('fwd_ms'))} {fmt(t.get('tv_fwd_ms'))} {fmt(t.get('gs_fwd_ms'))}"
              f" {fmt(ratio, 8, 2)} {fmt(o.get('bwd_ms'))} {fmt(t.get('tv_fwdbwd_ms'))} {fmt(t.get('gs_fwdbwd_ms'))}")
    if models:
        print("\n== InternImage at 224 (random weights)")
        for r in models:
            print(f"InternImage-{r['model'].upper():<3} batch {r['batch']:<3} {r['dtype']:<5} {r['ms']:>9.2f} ms {r['images_per_s']:>9.1f} images/s")

    if speedups:
        worst = min(speedups, key=lambda s: s[1])
        f32 = [s for s in speedups if s[0][2] == "F32"]
        verdicts.append(f"forward speed-up vs torchvision deform_conv2d: min {worst[1]:.2f}x ({worst[0][0]}, N={worst[0][1]}, {worst[0][2]})"
                        + (f", f32 min {min(s[1] for s in f32):.2f}x" if f32 else "")
                        + f"; target >= 3x: {'MET' if worst[1] >= 3 else 'NOT MET'}")
    else:
        verdicts.append("timings: incomplete (need both bench.log and torch.log)")
    print("\n== SUMMARY")
    for v in verdicts:
        print("  " + v)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "."))
