//! The AMX bf16 GEMM: `y = x @ w^T + b` on the tile unit of Intel Xeon CPUs from Sapphire Rapids
//! on (`TDPBF16PS`: a 16 x 32 bf16 tile times a 32 x 16 bf16 tile accumulated into a 16 x 16 f32
//! tile, 16384 flops per instruction).
//!
//! * Weights are packed once, when the layer is built, into panels of 32 output channels, each
//!   a sequence of 1 KiB B tiles in the VNNI pair layout `TDPBF16PS` reads (16 rows of bf16
//!   pairs along `k`, 16 columns), zero-padded to whole panels and to a depth multiple of 32.
//! * Activations are converted f32 -> bf16 (round to nearest even, `VCVTNE2PS2BF16`) per row
//!   block of a task into a per-thread buffer of 1 KiB A tiles (16 rows x 32 bf16, depth
//!   zero-padded); bf16 activations are copied.
//! * The micro-kernel keeps a 32 x 32 block (2 x 2 f32 C tiles, started from the bias) in tmm0-3,
//!   the two A tiles in tmm4-5 and the two B tiles in tmm6-7, over the whole depth; the block is
//!   stored into the output in place, or through a scratch block for partial rows or columns.
//!   GELU (when fused) then runs on the task's rows with the f32 kernels, as on the other paths.
//!
//! The instructions are written with `asm!` (Rust's AMX intrinsics are not stable). Each task
//! loads the tile configuration and releases the tiles when done. AMX is detected at run time
//! ([`detect`]): CPUID, the OS state in XCR0, and on Linux the permission to use the tile data
//! state, requested once from the kernel (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`).
//! Elsewhere (other OSes, no permission, AMD CPUs) AMX is not available and the AVX512_BF16
//! kernel runs.

use half::bf16;

/// Output channels per packed panel (two 16-column C tiles).
pub(super) const NR: usize = 32;
/// Rows of an A (and C) tile.
const TR: usize = 16;
/// bf16 values along the depth in one A tile row (16 pairs: one B tile has 16 pair rows).
const TK: usize = 32;
/// bf16 values in one A or B tile (1 KiB).
const TILE: usize = TR * TK;

/// Depth tiles of a depth `k` (zero-padded to a multiple of [`TK`]).
fn k_tiles(k: usize) -> usize {
    k.div_ceil(TK)
}

/// The index in the packed data of `w[j, kk]` for a weight of depth `k`:
/// panel `p = j / 32`, column half `h`, depth tile `t = kk / 32`; each (p, t, h) is one B tile of
/// 16 pair rows x 16 columns x 2 (row stride 64 bytes).
fn b_index(kt: usize, j: usize, kk: usize) -> usize {
    let (p, h, jj) = (j / NR, (j % NR) / TR, j % TR);
    let (t, kp, e) = (kk / TK, (kk % TK) / 2, kk % 2);
    ((p * kt + t) * 2 + h) * TILE + (kp * TR + jj) * 2 + e
}

/// Packs `w` ((n, k) row-major) as bf16 B tiles (values rounded to nearest even), zero-padded
/// to whole panels of [`NR`] columns and to a depth multiple of 32.
pub(super) fn pack(w: &[f32], n: usize, k: usize) -> Vec<u16> {
    let kt = k_tiles(k);
    let mut data = vec![0u16; n.div_ceil(NR) * kt * 2 * TILE];
    for (j, row) in w.chunks_exact(k).take(n).enumerate() {
        for (kk, &v) in row.iter().enumerate() {
            data[b_index(kt, j, kk)] = bf16::from_f32(v).to_bits();
        }
    }
    data
}

/// The inverse of [`pack`] (up to its rounding): the weight (n, k) row-major.
pub(super) fn unpack(data: &[u16], n: usize, k: usize) -> Vec<f32> {
    let kt = k_tiles(k);
    let mut w = vec![0f32; n * k];
    for (j, row) in w.chunks_exact_mut(k).enumerate() {
        for (kk, v) in row.iter_mut().enumerate() {
            *v = bf16::from_bits(data[b_index(kt, j, kk)]).to_f32();
        }
    }
    w
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::{block, detect};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{k_tiles, NR, TILE, TK, TR};
    use crate::cpu::gemm::Rows;
    use std::arch::asm;
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    /// Whether the CPU has AMX-TILE and AMX-BF16 with the tile shapes the kernel uses, the OS
    /// saves the tile state (XCR0 bits 17 and 18), and this process may use it (on Linux, the
    /// permission is requested here; other OSes: not available). Call once (the result is
    /// cached by [`crate::cpu::Isa::is_supported`]).
    pub(in crate::cpu) fn detect() -> bool {
        // CPUID exists on every x86-64 CPU (a safe intrinsic); leaves above the maximum reported
        // by leaf 0 are never queried.
        let cpuid = |leaf: u32, sub: u32| __cpuid_count(leaf, sub);
        if cpuid(0, 0).eax < 0x1e {
            return false;
        }
        // CPUID.(EAX=7, ECX=0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
        let edx7 = cpuid(7, 0).edx;
        if edx7 & (1 << 22) == 0 || edx7 & (1 << 24) == 0 {
            return false;
        }
        // Palette 1 (leaf 0x1D) holds 8 tiles of at least 16 rows x 64 bytes, and TMUL (leaf
        // 0x1E) multiplies 16 pair rows by 64 bytes.
        if cpuid(0x1d, 0).eax < 1 {
            return false;
        }
        let palette = cpuid(0x1d, 1);
        let (bytes_per_row, names, max_rows) = (
            palette.ebx & 0xffff,
            palette.ebx >> 16,
            palette.ecx & 0xffff,
        );
        let tmul = cpuid(0x1e, 0).ebx;
        let (max_k, max_n) = (tmul & 0xff, (tmul >> 8) & 0xffff);
        if bytes_per_row < 64 || names < 8 || max_rows < 16 || max_k < 16 || max_n < 64 {
            return false;
        }
        // CPUID.1:ECX bit 27 (OSXSAVE): XGETBV is enabled.
        if cpuid(1, 0).ecx & (1 << 27) == 0 {
            return false;
        }
        let (lo, _hi): (u32, u32);
        // SAFETY: OSXSAVE is set (checked above), so XGETBV with ECX = 0 (XCR0) is allowed; it
        // reads a register only.
        unsafe {
            asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") _hi,
                 options(nomem, nostack, preserves_flags));
        }
        // XCR0 bit 17 XTILECFG, bit 18 XTILEDATA: the OS manages the tile state.
        if lo & (0b11 << 17) != 0b11 << 17 {
            return false;
        }
        os_permission()
    }

    /// Linux (x86-64 ABI): asks the kernel for the tile data state, which is off by default for
    /// each process (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, once per process;
    /// it applies to all its threads). Fails, for example, when a thread's alternate signal
    /// stack is too small for the larger signal frame, or a seccomp filter refuses it.
    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    fn os_permission() -> bool {
        const SYS_ARCH_PRCTL: usize = 158;
        const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
        const XFEATURE_XTILEDATA: usize = 18;
        let ret: isize;
        // SAFETY: the x86-64 Linux `syscall` convention: number in rax, arguments in rdi and rsi,
        // result in rax, rcx and r11 clobbered. arch_prctl(ARCH_REQ_XCOMP_PERM, 18) takes two
        // integers, reads and writes no user memory, and only extends what the process may use.
        unsafe {
            asm!("syscall",
                 inlateout("rax") SYS_ARCH_PRCTL => ret,
                 in("rdi") ARCH_REQ_XCOMP_PERM,
                 in("rsi") XFEATURE_XTILEDATA,
                 lateout("rcx") _, lateout("r11") _,
                 options(nostack));
        }
        ret == 0
    }

    /// Other OSes: not known to be safe to enable here, so not available.
    #[cfg(not(all(target_os = "linux", target_pointer_width = "64")))]
    fn os_permission() -> bool {
        false
    }

    /// The tile configuration (palette 1): tmm0..tmm7 all 16 rows x 64 bytes (f32 C tiles of
    /// 16 x 16, bf16 A tiles of 16 x 32, B tiles of 16 pair rows x 16 columns).
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    static CONFIG: TileConfig = {
        let mut c = [0u8; 64];
        c[0] = 1; // palette 1
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // colsb[t] = 64 bytes (little-endian u16)
            c[48 + t] = TR as u8; // rows[t] = 16
            t += 1;
        }
        TileConfig(c)
    };

    /// The tiles configured for this thread; released on drop.
    struct Tiles(());

    impl Tiles {
        /// Loads [`CONFIG`] (zeroing every tile).
        ///
        /// # Safety
        /// The CPU supports AMX-TILE and the OS lets this process use the tile state
        /// ([`detect`] returned true).
        unsafe fn load() -> Self {
            // SAFETY: LDTILECFG reads the 64 bytes of CONFIG (a static of exactly that size);
            // the CPU and OS support it (the caller's contract).
            asm!("ldtilecfg [{cfg}]", cfg = in(reg) &CONFIG, options(nostack, readonly, preserves_flags));
            Tiles(())
        }
    }

    impl Drop for Tiles {
        fn drop(&mut self) {
            // SAFETY: a `Tiles` exists only after `Tiles::load`, whose contract is that the CPU
            // and OS support AMX-TILE; TILERELEASE touches no memory.
            unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
        }
    }

    /// One 64-byte line of an A tile (16 lines per tile), 64-byte aligned.
    #[repr(C, align(64))]
    #[derive(Clone, Copy)]
    struct Line([u16; TK]);

    /// A 32 x 32 f32 block for the partial blocks at the edges.
    #[repr(C, align(64))]
    struct Scratch([f32; 2 * TR * NR]);

    thread_local! {
        /// The A tiles of the current task (reused by the tasks of this thread).
        static A_TILES: RefCell<Vec<Line>> = const { RefCell::new(Vec::new()) };
    }

    /// Rows `r0..r1` of `x` (`k` values each) times the packed panels `p0..p1` of `data` (a
    /// weight (n, k) packed by [`super::pack`]) plus `bias`, into `y` (the first row of the
    /// block, row stride `ldy`); GELU is the caller's.
    ///
    /// # Safety
    /// The CPU supports AMX-TILE, AMX-BF16 and AVX-512 F/BW/VL with AVX512_BF16, and the OS
    /// lets this process use the tile state ([`crate::cpu::Isa::Amx`] is supported: AMX panels
    /// are only packed then); `x` holds rows `0..r1` of `k` values; `data` and `bias` are the
    /// packing of an (n, k) weight (`bias` zero-padded to whole panels, `p1 <= ceil(n / 32)`);
    /// `y` is valid for writes of rows `0..r1 - r0` x columns `32 p0 .. min(32 p1, n)` with row
    /// stride `ldy`, and no other thread touches that block.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::cpu) unsafe fn block(
        x: Rows,
        r0: usize,
        r1: usize,
        k: usize,
        n: usize,
        data: &[u16],
        bias: &[f32],
        p0: usize,
        p1: usize,
        y: *mut f32,
        ldy: usize,
    ) {
        let rows = r1 - r0;
        let (kt, rt) = (k_tiles(k), rows.div_ceil(TR));
        debug_assert!(data.len() >= p1 * kt * 2 * TILE && bias.len() >= p1 * NR);
        let mut own = Vec::new();
        A_TILES.with(|cell| {
            // Nothing in this function re-enters it on this thread (no rayon calls), so the
            // buffer is free; a fresh one otherwise keeps it correct anyway.
            let mut shared = cell.try_borrow_mut();
            let a = match shared.as_deref_mut() {
                Ok(v) => v,
                Err(_) => &mut own,
            };
            a.clear();
            a.resize(rt * kt * TR, Line([0; TK]));
            for i in 0..rows {
                let first = (i / TR) * kt * TR + i % TR;
                // SAFETY: the CPU supports AVX-512 F/BW/VL and AVX512_BF16 (contract); line
                // `first + t * 16` for t < kt is inside `a` (rt * kt * 16 lines), and row
                // r0 + i < r1 of x holds k values.
                match x {
                    Rows::F32(x) => to_bf16_row(&x[(r0 + i) * k..(r0 + i + 1) * k], a, first),
                    Rows::Bf16(x) => copy_bf16_row(&x[(r0 + i) * k..(r0 + i + 1) * k], a, first),
                }
            }
            let tiles = Tiles::load();
            let mut scratch = Scratch([0.0; 2 * TR * NR]);
            for p in p0..p1 {
                let b = data.as_ptr().add(p * kt * 2 * TILE);
                let bias = bias.as_ptr().add(p * NR);
                let cols = NR.min(n - p * NR);
                let mut i = 0;
                while i < rt {
                    let pair = i + 1 < rt;
                    let tile_rows = if pair { 2 * TR } else { TR };
                    let valid = (rows - i * TR).min(tile_rows);
                    let a_tiles = a.as_ptr().add(i * kt * TR).cast::<u16>();
                    let c = y.add(i * TR * ldy + p * NR);
                    if valid == tile_rows && cols == NR {
                        // SAFETY: rows i*16 .. i*16 + tile_rows and columns 32p .. 32p + 32 of
                        // the block are inside it (full rows and a full panel); A tiles i (and
                        // i + 1) hold kt tiles each, the panel kt x 2 B tiles, the bias 32
                        // values.
                        kernel(pair, a_tiles, kt, b, bias, c, ldy * 4);
                    } else {
                        // SAFETY: as above, into the 32 x 32 scratch block (row stride 128
                        // bytes); then only the valid rows and columns are copied out.
                        kernel(pair, a_tiles, kt, b, bias, scratch.0.as_mut_ptr(), NR * 4);
                        for r in 0..valid {
                            std::ptr::copy_nonoverlapping(
                                scratch.0.as_ptr().add(r * NR),
                                c.add(r * ldy),
                                cols,
                            );
                        }
                    }
                    i += if pair { 2 } else { 1 };
                }
            }
            drop(tiles);
        });
    }

    /// `c` (row stride `ldc` bytes) = `bias` + A tiles x B tiles over the whole depth, for 32
    /// rows (`pair`: two row tiles, tmm0..3) or 16 rows (tmm0..1), 32 columns.
    ///
    /// `a`: `kt` A tiles (1 KiB each, row stride 64 bytes) for rows 0..16, then `kt` for rows
    /// 16..32 when `pair`; `b`: the panel's `kt x 2` B tiles (columns 0..16 then 16..32 per
    /// depth tile); `bias`: 32 f32, broadcast to every row by a stride-0 tile load.
    ///
    /// # Safety
    /// The tiles are configured ([`Tiles::load`]); `a`, `b`, `bias` hold what is described
    /// above; `c` is valid for writes of 16 (32 when `pair`) rows of 32 f32 at stride `ldc`.
    #[inline(always)]
    unsafe fn kernel(
        pair: bool,
        a: *const u16,
        kt: usize,
        b: *const u16,
        bias: *const f32,
        c: *mut f32,
        ldc: usize,
    ) {
        let stride = 64usize;
        if pair {
            // SAFETY: per the contract: every tile load reads 16 rows of 64 bytes inside
            // the A tiles (a0 and a1 advance 1 KiB per depth tile, kt times), the B panel (b
            // advances 2 KiB, kt times) or the bias (stride 0: the same 64 bytes); the stores
            // write 16 rows x 64 bytes at c, c + 64, c + 16 ldc, c + 16 ldc + 64 (stride ldc),
            // inside the 32 x 32 f32 output block. kt >= 1. The instructions are supported
            // (AMX-TILE, AMX-BF16: checked by `detect` before any AMX panel is packed).
            asm!(
                "tileloadd tmm0, [{bias} + {zero}*1]",
                "tileloadd tmm1, [{bias} + {zero}*1 + 64]",
                "tileloadd tmm2, [{bias} + {zero}*1]",
                "tileloadd tmm3, [{bias} + {zero}*1 + 64]",
                "2:",
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm6, [{b} + {s}*1]",
                "tileloadd tmm7, [{b} + {s}*1 + 1024]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{a1} + {s}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a0}, 1024",
                "add {a1}, 1024",
                "add {b}, 2048",
                "dec {n}",
                "jnz 2b",
                "tilestored [{c} + {ldc}*1], tmm0",
                "tilestored [{c} + {ldc}*1 + 64], tmm1",
                "tilestored [{c2} + {ldc}*1], tmm2",
                "tilestored [{c2} + {ldc}*1 + 64], tmm3",
                bias = in(reg) bias,
                zero = in(reg) 0usize,
                a0 = inout(reg) a => _,
                a1 = inout(reg) a.add(kt * TILE) => _,
                b = inout(reg) b => _,
                n = inout(reg) kt => _,
                s = in(reg) stride,
                c = in(reg) c,
                c2 = in(reg) c.cast::<u8>().add(TR * ldc),
                ldc = in(reg) ldc,
                options(nostack),
            );
        } else {
            // SAFETY: as above, for one row tile: tmm0..1 (C), tmm4 (A), tmm6..7 (B); the
            // stores write 16 rows x 64 bytes at c and c + 64 (stride ldc).
            asm!(
                "tileloadd tmm0, [{bias} + {zero}*1]",
                "tileloadd tmm1, [{bias} + {zero}*1 + 64]",
                "2:",
                "tileloadd tmm4, [{a0} + {s}*1]",
                "tileloadd tmm6, [{b} + {s}*1]",
                "tileloadd tmm7, [{b} + {s}*1 + 1024]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "add {a0}, 1024",
                "add {b}, 2048",
                "dec {n}",
                "jnz 2b",
                "tilestored [{c} + {ldc}*1], tmm0",
                "tilestored [{c} + {ldc}*1 + 64], tmm1",
                bias = in(reg) bias,
                zero = in(reg) 0usize,
                a0 = inout(reg) a => _,
                b = inout(reg) b => _,
                n = inout(reg) kt => _,
                s = in(reg) stride,
                c = in(reg) c,
                ldc = in(reg) ldc,
                options(nostack),
            );
        }
    }

    /// Lanes `0..n` (n <= 16) of a 16-lane mask.
    fn mask16(n: usize) -> __mmask16 {
        ((1u32 << n.min(16)) - 1) as __mmask16
    }

    /// Converts one row (f32, `src.len()` = k) to bf16 (round to nearest even) into the A-tile
    /// lines `first + t * 16` (t < ceil(k / 32)) of `a`, the depth zero-padded.
    ///
    /// # Safety
    /// AVX-512 F and AVX512_BF16 available; lines `first + t * 16` exist in `a`.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    unsafe fn to_bf16_row(src: &[f32], a: &mut [Line], first: usize) {
        let k = src.len();
        for t in 0..k_tiles(k) {
            let k0 = t * TK;
            let len = (k - k0).min(TK);
            let lo = _mm512_maskz_loadu_ps(mask16(len), src.as_ptr().add(k0));
            let hi = if len > 16 {
                // k0 + 16 < k: the pointer is inside src.
                _mm512_maskz_loadu_ps(mask16(len - 16), src.as_ptr().add(k0 + 16))
            } else {
                _mm512_setzero_ps()
            };
            // Lanes 0..16 of the result from `lo`, 16..32 from `hi`.
            let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
            let line = &mut a[first + t * TR];
            _mm512_storeu_si512(line.0.as_mut_ptr().cast(), v);
        }
    }

    /// Copies one bf16 row into the A-tile lines `first + t * 16` of `a`, zero-padded.
    ///
    /// # Safety
    /// AVX-512 F/BW available; lines `first + t * 16` exist in `a`.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn copy_bf16_row(src: &[half::bf16], a: &mut [Line], first: usize) {
        let k = src.len();
        for t in 0..k_tiles(k) {
            let k0 = t * TK;
            let len = (k - k0).min(TK);
            let m: __mmask32 = if len == TK {
                u32::MAX
            } else {
                (1u32 << len) - 1
            };
            let v = _mm512_maskz_loadu_epi16(m, src.as_ptr().add(k0).cast());
            let line = &mut a[first + t * TR];
            _mm512_storeu_si512(line.0.as_mut_ptr().cast(), v);
        }
    }
}
