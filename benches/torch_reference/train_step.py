"""Same-machine PyTorch reference for one InternImage-T training step.

What this is: a stand-in for the official PyTorch InternImage code (classification model, classic
conv_head, ``core_op='DCNv3_pytorch'``, i.e. the pure-PyTorch DCNv3 core built on
``F.grid_sample``), re-written in plain PyTorch from the reimplementation spec
(``shared/spec/internimage.md``: sections 1.1, 2, 2.5 weight init, 3.1 and 3.2). No upstream code
is copied. The official CUDA DCNv3 op has no CPU kernel, so on a CPU the pure-PyTorch core is
exactly what the official code runs.

Why: to put our ``cargo bench --bench model -- train_t224_b8`` figure next to a PyTorch training
step measured on the same machine, with the same settings: InternImage-T at 224x224, batch 8, f32,
2 intra-op threads (1 inter-op thread), random weights with the spec's init, ``model.train()`` with
stochastic depth (drop_path_rate 0.1, linear over all blocks), cross-entropy, ``backward()``,
``torch.optim.AdamW`` (lr 1e-3, weight_decay 0.05). One warm-up step, then 3 timed steps (wall
time); the last line is

    RESULT torch_train_t224_b8 <median ms per image> <images per second> <peak RSS MiB>

(the same format as the Rust bench's ``RESULT train_t224_b8 ...`` line; peak RSS is ru_maxrss).

How to run (from the repository root):

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch numpy && \
        /tmp/tv/bin/python benches/torch_reference/train_step.py

Options: ``--threads N`` (default 2), ``--batch`` (8), ``--steps`` (3), ``--size`` (224),
``--parts`` (also print the forward / backward / optimizer split of each step), ``--check``
(quick smoke test: tiny config, one forward+backward at batch 2, size 64, plus a check of the
grid_sample DCNv3 core against the direct bilinear formula of the spec).
"""

import argparse
import math
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# Spec 1.1: parameters of InternImage-T with the 1k head (derived there, in millions, 2 decimals),
# and spec 2.5: 630 parameter tensors (+ 3 BatchNorm buffers).
T_PARAMS_M = 29.92
T_PARAM_TENSORS = 630


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class ToNHWC(nn.Module):
    def forward(self, x):
        return x.permute(0, 2, 3, 1)


class ToNCHW(nn.Module):
    def forward(self, x):
        return x.permute(0, 3, 1, 2)


def ln_channels_first(c):
    """LN over channels of an NCHW tensor (permute to NHWC, LN eps 1e-6, permute back)."""
    return nn.Sequential(ToNHWC(), nn.LayerNorm(c, eps=1e-6), ToNCHW())


def ln_nchw_to_nhwc(c):
    """NCHW in, LN over channels, NHWC out."""
    return nn.Sequential(ToNHWC(), nn.LayerNorm(c, eps=1e-6))


def ln_last(c):
    """LN over the last (channel) axis of an NHWC tensor."""
    return nn.Sequential(nn.LayerNorm(c, eps=1e-6))


class DropPath(nn.Module):
    """Stochastic depth per sample: keep with prob 1-p and scale kept samples by 1/(1-p)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = x.new_empty(shape).bernoulli_(keep).div_(keep)
        return x * mask


# --------------------------------------------------------------------------------------------
# DCNv3 (pure-PyTorch core, spec 3.2 "PyTorch reference")
# --------------------------------------------------------------------------------------------


def dcnv3_core_pytorch(value, offset, mask, k=3, stride=1, pad=1, dil=1, group=1,
                       group_channels=16, offset_scale=1.0):
    """value (N,H,W,G*Cg), offset (N,Ho,Wo,G*P*2) [g][p][(x,y)], mask (N,Ho,Wo,G*P) softmaxed.

    Zero-pads V, builds reference points + kernel grid (x-major point order), normalises to
    [-1,1] and samples with grid_sample(bilinear, zeros, align_corners=False) with the (n, g)
    pairs as the grid_sample batch, then multiplies by the mask and sums over the points.
    """
    n, h_in, w_in, _ = value.shape
    value = F.pad(value, [0, 0, pad, pad, pad, pad])  # pad W and H by `pad` (ph == pw)
    _, hp, wp, _ = value.shape
    h_out = (h_in + 2 * pad - (dil * (k - 1) + 1)) // stride + 1
    w_out = (w_in + 2 * pad - (dil * (k - 1) + 1)) // stride + 1
    hx = (dil * (k - 1)) // 2
    hy = hx
    p_count = k * k
    dev, dt = value.device, value.dtype

    # Reference points (normalised to [0,1] of the padded image), shape (Ho, Wo, 2) as (x, y).
    ref_y, ref_x = torch.meshgrid(
        torch.linspace(hy + 0.5, hy + 0.5 + (h_out - 1) * stride, h_out, dtype=dt, device=dev),
        torch.linspace(hx + 0.5, hx + 0.5 + (w_out - 1) * stride, w_out, dtype=dt, device=dev),
        indexing="ij",
    )
    ref = torch.stack((ref_x / wp, ref_y / hp), -1).reshape(1, h_out, w_out, 1, 2)

    # Kernel grid, x-major: p = i*k + j with i the column (x) and j the row (y). (P, 2) as (x, y).
    gx, gy = torch.meshgrid(
        torch.linspace(-hx, -hx + (k - 1) * dil, k, dtype=dt, device=dev),
        torch.linspace(-hy, -hy + (k - 1) * dil, k, dtype=dt, device=dev),
        indexing="ij",
    )
    grid = torch.stack((gx / wp, gy / hp), -1).reshape(p_count, 2)
    grid = grid.repeat(group, 1).reshape(1, 1, 1, group * p_count * 2) * offset_scale

    norm = torch.tensor([wp, hp], dtype=dt, device=dev).repeat(group * p_count)
    loc = ref.reshape(1, h_out, w_out, 1, 2).repeat(1, 1, 1, group * p_count, 1).flatten(3)
    loc = loc + grid + offset * offset_scale / norm  # (N, Ho, Wo, G*P*2)
    grids = 2.0 * loc - 1.0

    cg = group_channels
    # (N, Hp*Wp, G*Cg) -> (N*G, Cg, Hp, Wp)
    v = value.reshape(n, hp * wp, group * cg).transpose(1, 2).reshape(n * group, cg, hp, wp)
    # (N, Ho, Wo, G, P, 2) -> (N*G, Ho*Wo, P, 2)
    g = grids.reshape(n, h_out * w_out, group, p_count, 2).transpose(1, 2).flatten(0, 1)
    sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
    # sampled (N*G, Cg, Ho*Wo, P); mask -> (N*G, 1, Ho*Wo, P)
    m = mask.reshape(n, h_out * w_out, group, p_count).transpose(1, 2)
    m = m.reshape(n * group, 1, h_out * w_out, p_count)
    out = (sampled * m).sum(-1).reshape(n, group * cg, h_out * w_out)
    return out.transpose(1, 2).reshape(n, h_out, w_out, group * cg).contiguous()


def dcnv3_core_direct(value, offset, mask, group, offset_scale=1.0):
    """Slow direct evaluation of the spec 3.2 formula (k3 s1 p1 d1), for --check only."""
    n, h, w, c = value.shape
    cg = c // group
    off = offset.reshape(n, h, w, group, 9, 2)
    msk = mask.reshape(n, h, w, group, 9)
    out = torch.zeros_like(value)

    def tap(b, yy, xx, gi):
        if 0 <= yy < h and 0 <= xx < w:
            return value[b, yy, xx, gi * cg:(gi + 1) * cg]
        return torch.zeros(cg, dtype=value.dtype)

    for b in range(n):
        for hh in range(h):
            for ww in range(w):
                for gi in range(group):
                    acc = torch.zeros(cg, dtype=value.dtype)
                    for p in range(9):
                        i, j = divmod(p, 3)  # x-major: p = 3i + j
                        x = ww + offset_scale * (i - 1 + off[b, hh, ww, gi, p, 0].item())
                        y = hh + offset_scale * (j - 1 + off[b, hh, ww, gi, p, 1].item())
                        if not (-1 < y < h and -1 < x < w):
                            continue
                        y0, x0 = math.floor(y), math.floor(x)
                        ly, lx = y - y0, x - x0
                        val = ((1 - ly) * (1 - lx) * tap(b, y0, x0, gi)
                               + (1 - ly) * lx * tap(b, y0, x0 + 1, gi)
                               + ly * (1 - lx) * tap(b, y0 + 1, x0, gi)
                               + ly * lx * tap(b, y0 + 1, x0 + 1, gi))
                        acc = acc + msk[b, hh, ww, gi, p] * val
                    out[b, hh, ww, gi * cg:(gi + 1) * cg] = acc
    return out


class DCNv3(nn.Module):
    """DCNv3 module (spec 3.1), NHWC in and out; parameter names as in the official state dict."""

    def __init__(self, channels, group, offset_scale=1.0, kernel_size=3, dw_kernel_size=3):
        super().__init__()
        self.channels = channels
        self.group = group
        self.group_channels = channels // group
        self.offset_scale = offset_scale
        self.k = kernel_size
        self.p = kernel_size * kernel_size
        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, dw_kernel_size, 1, (dw_kernel_size - 1) // 2,
                      groups=channels),
            ln_nchw_to_nhwc(channels),
            nn.GELU(),
        )
        self.offset = nn.Linear(channels, group * self.p * 2)
        self.mask = nn.Linear(channels, group * self.p)
        self.input_proj = nn.Linear(channels, channels)
        self.output_proj = nn.Linear(channels, channels)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.constant_(self.offset.weight, 0.0)
        nn.init.constant_(self.offset.bias, 0.0)
        nn.init.constant_(self.mask.weight, 0.0)
        nn.init.constant_(self.mask.bias, 0.0)
        nn.init.xavier_uniform_(self.input_proj.weight)
        nn.init.constant_(self.input_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, u):
        n, h, w, _ = u.shape
        v = self.input_proj(u)
        f = self.dw_conv(u.permute(0, 3, 1, 2))
        off = self.offset(f)
        m = self.mask(f).reshape(n, h, w, self.group, self.p).softmax(-1)
        m = m.reshape(n, h, w, self.group * self.p).type_as(v)
        y = dcnv3_core_pytorch(v, off, m, k=self.k, stride=1, pad=(self.k - 1) // 2, dil=1,
                               group=self.group, group_channels=self.group_channels,
                               offset_scale=self.offset_scale)
        return self.output_proj(y)


# --------------------------------------------------------------------------------------------
# InternImage (classification, classic head)
# --------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, c, ratio=4.0):
        super().__init__()
        hidden = int(c * ratio)
        self.fc1 = nn.Linear(c, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, c)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """InternImageLayer for T: pre-norm, no layer scale, no post norms."""

    def __init__(self, c, g, drop_path, offset_scale, mlp_ratio):
        super().__init__()
        self.norm1 = ln_last(c)
        self.dcn = DCNv3(c, g, offset_scale)
        self.drop_path = DropPath(drop_path)
        self.norm2 = ln_last(c)
        self.mlp = MLP(c, mlp_ratio)

    def forward(self, x):
        x = x + self.drop_path(self.dcn(self.norm1(x)))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, 2 * c, 3, 2, 1, bias=False)
        self.norm = ln_nchw_to_nhwc(2 * c)

    def forward(self, x):  # NHWC -> NHWC at half resolution
        return self.norm(self.conv(x.permute(0, 3, 1, 2)))


class Level(nn.Module):
    def __init__(self, c, depth, g, dprs, offset_scale, mlp_ratio, downsample):
        super().__init__()
        self.blocks = nn.ModuleList(
            [Block(c, g, dprs[i], offset_scale, mlp_ratio) for i in range(depth)])
        self.norm = ln_last(c)  # present for T (post_norm False)
        self.downsample = Downsample(c) if downsample else None

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class StemEmbed(nn.Module):
    def __init__(self, in_chans, c):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, c // 2, 3, 2, 1)
        self.norm1 = ln_channels_first(c // 2)
        self.act = nn.GELU()
        self.conv2 = nn.Conv2d(c // 2, c, 3, 2, 1)
        self.norm2 = ln_nchw_to_nhwc(c)

    def forward(self, x):  # NCHW in, NHWC out
        x = self.act(self.norm1(self.conv1(x)))
        return self.norm2(self.conv2(x))


class InternImage(nn.Module):
    def __init__(self, channels=64, depths=(4, 4, 18, 4), groups=(4, 8, 16, 32),
                 num_classes=1000, mlp_ratio=4.0, drop_path_rate=0.1, offset_scale=1.0,
                 cls_scale=1.5):
        super().__init__()
        self.patch_embed = StemEmbed(3, channels)
        total = sum(depths)
        dpr = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        self.levels = nn.ModuleList()
        start = 0
        for i, (d, g) in enumerate(zip(depths, groups)):
            c = channels * 2 ** i
            self.levels.append(Level(c, d, g, dpr[start:start + d], offset_scale, mlp_ratio,
                                     downsample=i < len(depths) - 1))
            start += d
        c_last = channels * 2 ** (len(depths) - 1)
        c_head = int(c_last * cls_scale)
        self.conv_head = nn.Sequential(
            nn.Conv2d(c_last, c_head, 1, bias=False),
            nn.Sequential(nn.BatchNorm2d(c_head), nn.GELU()),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_head, num_classes)
        self.apply(self._init_weights)
        # _init_weights overwrote the DCN-specific init: redo it (spec 2.5 order: "then DCN ...").
        for mod in self.modules():
            if isinstance(mod, DCNv3):
                mod._reset_parameters()

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0.0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.weight, 1.0)
            nn.init.constant_(m.bias, 0.0)

    def forward(self, x):
        x = self.patch_embed(x)
        for lvl in self.levels:
            x = lvl(x)
        x = self.conv_head(x.permute(0, 3, 1, 2))
        x = torch.flatten(self.avgpool(x), 1)
        return self.head(x)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_check():
    torch.manual_seed(0)
    # 1) grid_sample core vs the direct spec formula (f64, random offsets incl. out-of-image).
    n, h, w, g, cg = 1, 5, 6, 2, 3
    val = torch.randn(n, h, w, g * cg, dtype=torch.float64)
    off = torch.randn(n, h, w, g * 9 * 2, dtype=torch.float64) * 1.5
    msk = torch.randn(n, h, w, g, 9, dtype=torch.float64).softmax(-1).reshape(n, h, w, g * 9)
    for sigma in (1.0, 2.0):
        a = dcnv3_core_pytorch(val, off, msk, group=g, group_channels=cg, offset_scale=sigma)
        b = dcnv3_core_direct(val, off, msk, group=g, offset_scale=sigma)
        err = (a - b).abs().max().item()
        print(f"check: dcnv3 core grid_sample vs direct formula, offset_scale {sigma}: "
              f"max abs err {err:.2e}")
        assert err < 1e-9, err
    # 2) tiny model, one forward + backward at batch 2, size 64, train mode with drop path.
    model = InternImage(channels=16, depths=(1, 1, 2, 1), groups=(1, 2, 4, 8), num_classes=10,
                        drop_path_rate=0.1)
    model.train()
    nparams = sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 3, 64, 64)
    y = torch.randint(0, 10, (2,))
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    print(f"check: tiny model {nparams} params, logits shape {tuple(logits.shape)}, "
          f"loss {loss.item():.4f}")
    print(f"check: all {len(list(model.parameters()))} parameters have a grad: {not missing}"
          + (f" (missing: {missing})" if missing else ""))
    assert tuple(logits.shape) == (2, 10) and not missing
    print("check: OK")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--check", action="store_true", help="tiny smoke test, then exit")
    ap.add_argument("--parts", action="store_true", help="print forward/backward/optimizer split")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()} "
          f"(interop {torch.get_num_interop_threads()})")

    if args.check:
        run_check()
        return

    torch.manual_seed(0)
    model = InternImage(channels=64, depths=(4, 4, 18, 4), groups=(4, 8, 16, 32),
                        num_classes=1000, drop_path_rate=0.1, offset_scale=1.0)
    model.train()
    params = list(model.parameters())
    nparams = sum(p.numel() for p in params)
    print(f"InternImage-T: {nparams} parameters ({nparams / 1e6:.2f} M) in {len(params)} tensors "
          f"(spec: {T_PARAMS_M} M, {T_PARAM_TENSORS} tensors)")
    assert round(nparams / 1e6, 2) == T_PARAMS_M, nparams
    assert len(params) == T_PARAM_TENSORS, len(params)

    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    x = torch.randn(args.batch, 3, args.size, args.size)
    labels = torch.randint(0, 1000, (args.batch,))

    def step():
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits, labels)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        return t3 - t0, (t1 - t0, t2 - t1, t3 - t2), loss.item()

    total, parts, loss = step()
    print(f"warm-up: {total * 1e3:.0f} ms, loss {loss:.4f}"
          + (f" (forward {parts[0] * 1e3:.0f} ms, backward {parts[1] * 1e3:.0f} ms, "
             f"optimizer {parts[2] * 1e3:.0f} ms)" if args.parts else ""))
    times = []
    for i in range(args.steps):
        total, parts, loss = step()
        times.append(total)
        print(f"step {i}: {total * 1e3:.0f} ms, loss {loss:.4f}"
              + (f" (forward {parts[0] * 1e3:.0f} ms, backward {parts[1] * 1e3:.0f} ms, "
                 f"optimizer {parts[2] * 1e3:.0f} ms)" if args.parts else ""))
    med = statistics.median(times)
    per_img = med / args.batch
    print(f"RESULT torch_train_t{args.size}_b{args.batch} {per_img * 1e3:.2f} {1.0 / per_img:.2f} "
          f"{peak_rss_mib():.1f}")


if __name__ == "__main__":
    main()
