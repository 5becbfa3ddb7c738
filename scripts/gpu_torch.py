#!/usr/bin/env python3
"""GPU-side Python checks for the DCNv3 kernels (run by scripts/gpu_check.sh on a machine with
an NVIDIA GPU, PyTorch, torchvision and CuPy; no Rust needed).

  gpu_torch.py gate  PTX      first gate: load our PTX (kernels/dcnv3.cu) with CuPy, run the
                              forward (f32/f16/bf16, every vector width) and the backward (f32/f16/bf16)
                              on random cases covering strides, dilation, padding, kernel 5,
                              remove_center, offset_scale 2, and compare with an independent
                              PyTorch float64 reference (gather formulation, autograd for grads).
  gpu_torch.py bench [--quick] timings of torchvision.ops.deform_conv2d (depthwise, ones weight,
                              G offset groups: the DCNv3 core's work) and of PyTorch's grid_sample
                              formulation at the same shapes as benches/dcnv3_gpu.rs; prints
                              TORCH_JSON lines for scripts/gpu_summary.py.

Conventions (kernels/dcnv3_common.h): channels-last tensors, input (N,H,W,G*Cg), offset
(N,Ho,Wo,G*P*2) with (x, y) pairs, mask (N,Ho,Wo,G*P), points x-major (column outer).
"""
import json
import math
import sys
import time

import torch
import torch.nn.functional as F

PARAM_FIELDS = [
    "batch", "h_in", "w_in", "h_out", "w_out", "group", "group_channels", "points",
    "kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w", "dilation_h", "dilation_w",
    "remove_center", "lanes", "offset_scale", "reserved",
]


def out_size(h, k, s, p, d):
    return (h + 2 * p - (d * (k - 1) + 1)) // s + 1


def points(kh, kw, rc):
    return [(i, j) for i in range(kw) for j in range(kh) if not (rc and i == kw // 2 and j == kh // 2)]


def dcnv3_ref(x, off, mask, cfg):
    """Independent reference: explicit bilinear gather with zero padding (any dtype, autograd)."""
    kh, kw, sh, sw, ph, pw, dh, dw, g, cg, scale, rc = (cfg[k] for k in (
        "kh", "kw", "sh", "sw", "ph", "pw", "dh", "dw", "g", "cg", "scale", "rc"))
    n, h, w, c = x.shape
    ho, wo = out_size(h, kh, sh, ph, dh), out_size(w, kw, sw, pw, dw)
    pts = points(kh, kw, rc)
    p = len(pts)
    dev, dt = x.device, x.dtype
    hx, hy = dw * (kw - 1) // 2, dh * (kh - 1) // 2
    off = off.reshape(n, ho, wo, g, p, 2)
    m = mask.reshape(n, ho, wo, g, p)
    ii = torch.tensor([i for i, _ in pts], device=dev, dtype=dt)
    jj = torch.tensor([j for _, j in pts], device=dev, dtype=dt)
    wgrid = torch.arange(wo, device=dev, dtype=dt).view(1, 1, wo, 1, 1)
    hgrid = torch.arange(ho, device=dev, dtype=dt).view(1, ho, 1, 1, 1)
    px = wgrid * sw - pw + hx + scale * (ii * dw - hx + off[..., 0])
    py = hgrid * sh - ph + hy + scale * (jj * dh - hy + off[..., 1])
    inside = (py > -1) & (px > -1) & (py < h) & (px < w)
    y0, x0 = torch.floor(py).detach(), torch.floor(px).detach()
    ly, lx = py - y0, px - x0
    xg = x.reshape(n, h, w, g, cg)
    n_idx = torch.arange(n, device=dev).view(n, 1, 1, 1, 1)
    g_idx = torch.arange(g, device=dev).view(1, 1, 1, g, 1)

    def tap(yy, xx, wgt):
        valid = inside & (yy >= 0) & (yy <= h - 1) & (xx >= 0) & (xx <= w - 1)
        yc = yy.clamp(0, h - 1).long()
        xc = xx.clamp(0, w - 1).long()
        v = xg[n_idx, yc, xc, g_idx]  # (n, ho, wo, g, p, cg)
        return v * (wgt * valid.to(dt)).unsqueeze(-1)

    val = (tap(y0, x0, (1 - ly) * (1 - lx)) + tap(y0, x0 + 1, (1 - ly) * lx)
           + tap(y0 + 1, x0, ly * (1 - lx)) + tap(y0 + 1, x0 + 1, ly * lx))
    return (val * m.unsqueeze(-1)).sum(4).reshape(n, ho, wo, g * cg)


def dcnv3_grid_sample(x, off, mask, g, cg, scale):
    """PyTorch's grid_sample formulation of the DCNv3 core (InternImage: k3, s1, p1, d1)."""
    n, h, w, c = x.shape
    p = 9
    hp, wp = h + 2, w + 2
    v = F.pad(x, (0, 0, 1, 1, 1, 1)).reshape(n, hp * wp, g, cg).permute(0, 2, 3, 1).reshape(n * g, cg, hp, wp)
    dev, dt = x.device, x.dtype
    pts = points(3, 3, False)
    ii = torch.tensor([i for i, _ in pts], device=dev, dtype=dt) - 1
    jj = torch.tensor([j for _, j in pts], device=dev, dtype=dt) - 1
    off = off.reshape(n, h, w, g, p, 2)
    wgrid = torch.arange(w, device=dev, dtype=dt).view(1, 1, w, 1, 1)
    hgrid = torch.arange(h, device=dev, dtype=dt).view(1, h, 1, 1, 1)
    gx = (wgrid + 1.5 + scale * (ii + off[..., 0])) * (2.0 / wp) - 1
    gy = (hgrid + 1.5 + scale * (jj + off[..., 1])) * (2.0 / hp) - 1
    grid = torch.stack([gx, gy], -1).permute(0, 3, 1, 2, 4, 5).reshape(n * g, h * w, p, 2)
    s = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # (n*g, cg, h*w, p)
    m = mask.reshape(n, h * w, g, p).permute(0, 2, 1, 3).reshape(n * g, 1, h * w, p)
    out = (s * m).sum(-1)  # (n*g, cg, h*w)
    return out.reshape(n, g * cg, h * w).transpose(1, 2).reshape(n, h, w, g * cg)


# ---------------------------------------------------------------------------------------------
# CuPy gate

def gate(ptx_path):
    import cupy
    import numpy as np

    mod = cupy.RawModule(path=ptx_path)
    pdtype = np.dtype([(f, np.float32 if f == "offset_scale" else np.int32) for f in PARAM_FIELDS])
    assert pdtype.itemsize == 80

    def params(cfg, n, h, w, ho, wo, p, lanes):
        a = np.zeros(1, dtype=pdtype)
        vals = dict(batch=n, h_in=h, w_in=w, h_out=ho, w_out=wo, group=cfg["g"], group_channels=cfg["cg"],
                    points=p, kernel_h=cfg["kh"], kernel_w=cfg["kw"], stride_h=cfg["sh"], stride_w=cfg["sw"],
                    pad_h=cfg["ph"], pad_w=cfg["pw"], dilation_h=cfg["dh"], dilation_w=cfg["dw"],
                    remove_center=int(cfg["rc"]), lanes=lanes, offset_scale=cfg["scale"], reserved=0)
        for k, v in vals.items():
            a[k] = v
        return a  # a 1-element structured array is passed by value as the C struct

    def cp(t):  # torch tensor -> cupy array sharing memory (bf16 viewed as int16)
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        return cupy.asarray(t)

    def bwd_lanes(cg, vec):
        chunks = -(-cg // vec)
        lanes = 1
        while lanes * 2 <= min(chunks, 32):
            lanes *= 2
        return lanes

    cases = [
        dict(name="basic", n=2, h=7, w=9, kh=3, kw=3, sh=1, sw=1, ph=1, pw=1, dh=1, dw=1, g=4, cg=16, scale=1.0, rc=False),
        dict(name="scale2", n=1, h=8, w=6, kh=3, kw=3, sh=1, sw=1, ph=1, pw=1, dh=1, dw=1, g=3, cg=32, scale=2.0, rc=False),
        dict(name="k5s2d2", n=3, h=13, w=11, kh=5, kw=5, sh=2, sw=2, ph=2, pw=2, dh=2, dw=1, g=2, cg=8, scale=1.0, rc=False),
        dict(name="rect_rc", n=1, h=9, w=10, kh=3, kw=3, sh=1, sw=2, ph=0, pw=1, dh=1, dw=2, g=5, cg=24, scale=1.5, rc=True),
        dict(name="cg3", n=2, h=5, w=4, kh=3, kw=3, sh=1, sw=1, ph=1, pw=1, dh=1, dw=1, g=1, cg=3, scale=1.0, rc=False),
        dict(name="T-like", n=4, h=28, w=28, kh=3, kw=3, sh=1, sw=1, ph=1, pw=1, dh=1, dw=1, g=8, cg=16, scale=1.0, rc=False),
    ]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    fails, runs = [], 0
    for cfg in cases:
        n, h, w, g, cg = cfg["n"], cfg["h"], cfg["w"], cfg["g"], cfg["cg"]
        ho, wo = out_size(h, cfg["kh"], cfg["sh"], cfg["ph"], cfg["dh"]), out_size(w, cfg["kw"], cfg["sw"], cfg["pw"], cfg["dw"])
        p = len(points(cfg["kh"], cfg["kw"], cfg["rc"]))
        x = torch.randn(n, h, w, g * cg, device=dev, dtype=torch.float64)
        off = 1.5 * torch.randn(n, ho, wo, g * p * 2, device=dev, dtype=torch.float64)
        mask = torch.softmax(torch.randn(n, ho, wo, g, p, device=dev, dtype=torch.float64), -1).reshape(n, ho, wo, g * p)
        go = torch.randn(n, ho, wo, g * cg, device=dev, dtype=torch.float64)
        for dt, tag, vecs, tol in [(torch.float32, "f32", [4, 2, 1], 2e-5), (torch.float16, "f16", [8, 4, 2, 1], 4e-3),
                                   (torch.bfloat16, "bf16", [8, 4, 2, 1], 3e-2)]:
            xs, offs, ms, gos = (t.to(dt) for t in (x, off, mask, go))
            # Reference on the rounded inputs, in float64, with autograd.
            xr, offr, mr = (t.double().requires_grad_(True) for t in (xs, offs, ms))
            ref = dcnv3_ref(xr, offr, mr, cfg)
            ref_grads = torch.autograd.grad((ref * gos.double()).sum(), (xr, offr, mr))
            ref = ref.detach()
            scale_out = ref.abs().max().item()
            for vec in vecs:
                if cg % vec:
                    continue
                runs += 1
                lanes = cg // vec
                out = torch.empty(n, ho, wo, g * cg, device=dev, dtype=dt)
                total = n * ho * wo * g * lanes
                fn = mod.get_function(f"dcnv3_fwd_{tag}_v{vec}")
                fn(((total + 255) // 256,), (256,), (params(cfg, n, h, w, ho, wo, p, lanes), cp(xs), cp(offs), cp(ms), cp(out)))
                torch.cuda.synchronize()
                err = (out.double() - ref).abs().max().item()
                if not err <= tol * max(1.0, scale_out):
                    fails.append(f"{cfg['name']} fwd {tag} v{vec}: max|diff| {err:.3g}")
                # Backward.
                lanes = bwd_lanes(cg, vec)
                total = n * ho * wo * g * lanes
                gin = torch.zeros(n, h, w, g * cg, device=dev, dtype=torch.float32)
                goff = torch.empty_like(offs)
                gmask = torch.empty_like(ms)
                fn = mod.get_function(f"dcnv3_bwd_{tag}_v{vec}")
                fn(((total + 255) // 256,), (256,),
                   (params(cfg, n, h, w, ho, wo, p, lanes), cp(xs), cp(offs), cp(ms), cp(gos), cp(gin), cp(goff), cp(gmask)))
                gin_t = torch.empty_like(xs)
                cast = mod.get_function(f"dcnv3_cast_f32_{tag}")
                ne = gin.numel()
                cast(((ne + 255) // 256,), (256,), (cp(gin), cp(gin_t), np.int64(ne)))
                torch.cuda.synchronize()
                for name, got, want in zip(("grad_input", "grad_offset", "grad_mask"), (gin_t, goff, gmask), ref_grads):
                    s = want.abs().max().item()
                    err = (got.double() - want).abs().max().item()
                    gtol = (1e-4 if tag == "f32" else 2 * tol) * max(1.0, s)
                    if not err <= gtol:
                        fails.append(f"{cfg['name']} bwd {tag} v{vec} lanes {lanes} {name}: max|diff| {err:.3g} (scale {s:.3g})")
        # Cross-check of the two PyTorch formulations (only where grid_sample's applies).
        if (cfg["kh"], cfg["kw"], cfg["sh"], cfg["sw"], cfg["ph"], cfg["pw"], cfg["dh"], cfg["dw"], cfg["rc"]) == (3, 3, 1, 1, 1, 1, 1, 1, False):
            a = dcnv3_ref(x, off, mask, cfg)
            b = dcnv3_grid_sample(x, off, mask, g, cg, cfg["scale"])
            err = (a - b).abs().max().item()
            if err > 1e-9:
                fails.append(f"{cfg['name']}: gather reference vs grid_sample formulation differ by {err:.3g}")
    print(f"CUPY_GATE runs={runs} failures={len(fails)}")
    for f in fails:
        print("  FAIL", f)
    return 0 if not fails else 1


# ---------------------------------------------------------------------------------------------
# Timings of the PyTorch baselines

def median_ms(fn, min_iters=5, max_iters=50, budget_s=0.5):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    start = time.perf_counter()
    while len(ts) < min_iters or (len(ts) < max_iters and time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def bench(quick):
    import torchvision
    from torchvision.ops import deform_conv2d

    dev = torch.device("cuda")
    print(f"== PyTorch baselines on {torch.cuda.get_device_name(0)} (torch {torch.__version__}, torchvision {torchvision.__version__})")
    shapes = [("T stage1 224", 56, 56, 4), ("T stage2 224", 28, 28, 8), ("T stage3 224", 14, 14, 16),
              ("T stage4 224", 7, 7, 32), ("det stage1 800x1344", 200, 336, 4)]
    batches = [1] if quick else [1, 16]
    for dt, tag in [(torch.float32, "F32"), (torch.float16, "F16"), (torch.bfloat16, "BF16")]:
        for n in batches:
            for label, h, w, g in shapes:
                cg, p = 16, 9
                c = g * cg
                x = torch.randn(n, h, w, c, device=dev, dtype=dt)
                off = 1.5 * torch.randn(n, h, w, g * p * 2, device=dev, dtype=dt)
                mask = torch.softmax(torch.randn(n, h, w, g, p, device=dev, dtype=torch.float32), -1).reshape(n, h, w, g * p).to(dt)
                row = dict(kind="torch", label=label, n=n, h=h, w=w, c=c, g=g, dtype=tag)
                # torchvision: NCHW, offsets (N, 2*G*9, H, W), mask (N, G*9, H, W), depthwise ones weight.
                xn = x.permute(0, 3, 1, 2).contiguous()
                offn = off.permute(0, 3, 1, 2).contiguous()
                mn = mask.permute(0, 3, 1, 2).contiguous()
                wt = torch.ones(c, 1, 3, 3, device=dev, dtype=dt)
                try:
                    row["tv_fwd_ms"] = median_ms(lambda: deform_conv2d(xn, offn, wt, padding=1, mask=mn))
                    xg, og, mg = (t.clone().requires_grad_(True) for t in (xn, offn, mn))
                    gout = torch.randn(n, c, h, w, device=dev, dtype=dt)

                    def tv_fb():
                        y = deform_conv2d(xg, og, wt, padding=1, mask=mg)
                        torch.autograd.grad(y, (xg, og, mg), gout)
                    row["tv_fwdbwd_ms"] = median_ms(tv_fb)
                except Exception as e:  # e.g. a dtype torchvision does not support
                    row["tv_error"] = str(e).splitlines()[0][:120]
                try:
                    with torch.no_grad():
                        row["gs_fwd_ms"] = median_ms(lambda: dcnv3_grid_sample(x, off, mask, g, cg, 1.0))
                    xg, og, mg = (t.clone().requires_grad_(True) for t in (x, off, mask))
                    gout = torch.randn(n, h, w, c, device=dev, dtype=dt)

                    def gs_fb():
                        y = dcnv3_grid_sample(xg, og, mg, g, cg, 1.0)
                        torch.autograd.grad(y, (xg, og, mg), gout)
                    row["gs_fwdbwd_ms"] = median_ms(gs_fb)
                except Exception as e:
                    row["gs_error"] = str(e).splitlines()[0][:120]
                print(f"{label:<22} {n:>3} {h:>4}x{w:<4} C{c:<4} G{g:<3} {tag:<5} "
                      f"tv fwd {row.get('tv_fwd_ms', float('nan')):>9.4f} ms  grid_sample fwd {row.get('gs_fwd_ms', float('nan')):>9.4f} ms")
                print("TORCH_JSON " + json.dumps(row))
                del x, off, mask, xn, offn, mn
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "gate":
        sys.exit(gate(sys.argv[2]))
    if len(sys.argv) >= 2 and sys.argv[1] == "bench":
        sys.exit(bench("--quick" in sys.argv))
    print(__doc__)
    sys.exit(2)
