//! Small helpers for the auto-vectorised CPU kernels, and the one dispatch macro.
//!
//! The kernels are written as plain loops over contiguous `f32` slices, generic over `FMA`, and
//! instantiated once per instruction set by [`dispatch!`]: inside
//! `#[target_feature(enable = ...)]` functions for AVX2+FMA and AVX-512 on x86-64 (so release
//! builds without `-C target-cpu=native` still get wide vectors and fused multiply-adds), with
//! FMA on aarch64 (NEON is baseline there), and without FMA for the portable path.

/// `a * b + c`, fused when `FMA` is true (only instantiate `FMA = true` where FMA is available:
/// elsewhere `mul_add` is a slow library call).
#[inline(always)]
pub(crate) fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// `exp(x)` for f32 without library calls, so loops over it vectorise: Cody-Waite range reduction
/// to `|r| <= ln2/2`, the classic degree-7 (Cephes) polynomial, and `2^n` by exponent bits.
/// About 1 ulp over [-87.3, 88.3]; inputs are clamped there (so `exp(-inf)` gives ~1e-38, not 0).
#[inline(always)]
pub(crate) fn exp_f32<const FMA: bool>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a library call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let t = fmadd::<FMA>(x, LOG2E, ROUND);
    let n = t - ROUND;
    let r = fmadd::<FMA>(-n, LN2_HI, x);
    let r = fmadd::<FMA>(-n, LN2_LO, r);
    let mut p = 1.987_569_1e-4;
    p = fmadd::<FMA>(p, r, 1.398_2e-3);
    p = fmadd::<FMA>(p, r, 8.333_452e-3);
    p = fmadd::<FMA>(p, r, 4.166_579_6e-2);
    p = fmadd::<FMA>(p, r, 1.666_666_5e-1);
    p = fmadd::<FMA>(p, r, 0.5);
    let y = fmadd::<FMA>(p, r * r, r) + 1.0;
    // `t`'s low mantissa bits hold n (|n| <= 127): 2^n from integer ops only (a float-to-int
    // `as` cast would not vectorise, because of its saturating semantics).
    let scale = f32::from_bits(t.to_bits().wrapping_sub(0x4B40_0000 - 127) << 23);
    y * scale
}

/// Defines `$name(isa, args)` that runs `$generic` compiled for the instruction set `isa` (an
/// [`crate::cpu::Isa`] of a [`crate::cpu::KernelPolicy`]): `$generic::<true>` inside an
/// AVX-512 or an AVX2+FMA `target_feature` function on x86-64, `$generic::<true>` on aarch64
/// (NEON), `$generic::<false>` for [`crate::cpu::Isa::Portable`]. An `isa` the CPU does not
/// support runs the portable instantiation (policies never hold one; this keeps it sound).
///
/// With `avx2: $fast` a hand-written kernel (`unsafe fn` of the same signature compiled for
/// AVX2+FMA) replaces `$generic::<true>` for AVX2; with `avx512: $fast512` likewise for AVX-512.
macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) => $generic:ident
        $(, avx2: $fast2:path)? $(, avx512: $fast512:path)? $(,)?) => {
        $(#[$m])*
        #[allow(unused_variables, clippy::too_many_arguments)]
        $vis fn $name(isa: $crate::cpu::Isa, $($arg: $ty),*) {
            use $crate::cpu::Isa;
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(unused_imports)]
                use std::arch::x86_64 as _;
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
                #[allow(dead_code)]
                unsafe fn generic512($($arg: $ty),*) {
                    $generic::<true>($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(dead_code)]
                unsafe fn generic2($($arg: $ty),*) {
                    $generic::<true>($($arg),*)
                }
                #[allow(unused_mut, unused_assignments)]
                let mut avx512: unsafe fn($($ty),*) = generic512;
                $( avx512 = $fast512; )?
                #[allow(unused_mut, unused_assignments)]
                let mut avx2: unsafe fn($($ty),*) = generic2;
                $( avx2 = $fast2; )?
                match isa {
                    Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx if isa.is_supported() => {
                        // SAFETY: the CPU supports AVX-512 F/BW/VL/DQ, AVX2 and FMA (checked
                        // just above), the features the kernel was compiled for; the arguments
                        // are passed on unchanged.
                        unsafe { avx512($($arg),*) }
                    }
                    Isa::Avx2 | Isa::Avx512 | Isa::Avx512Bf16 | Isa::Amx
                        if Isa::Avx2.is_supported() =>
                    {
                        // SAFETY: the CPU supports AVX2 and FMA (checked just above), the
                        // features the kernel was compiled for; the arguments are unchanged.
                        unsafe { avx2($($arg),*) }
                    }
                    _ => $generic::<false>($($arg),*),
                }
            }
            #[cfg(target_arch = "aarch64")]
            {
                match isa {
                    Isa::Portable => $generic::<false>($($arg),*),
                    _ => $generic::<true>($($arg),*),
                }
            }
            #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
            {
                $generic::<false>($($arg),*)
            }
        }
    };
}
pub(crate) use dispatch;

/// `half::bf16::from_f32(v).to_bits()`, bit for bit (round to nearest even; a NaN keeps its
/// sign and upper payload and becomes quiet), written without branches so that loops over it
/// vectorise. (Not `VCVTNE2PS2BF16`: that instruction flushes denormals to zero.)
#[inline(always)]
pub(crate) fn bf16_bits(v: f32) -> u16 {
    let x = v.to_bits();
    let nan = (x & 0x7FFF_FFFF) > 0x7F80_0000;
    let round_up = (x & 0x8000) != 0 && (x & 0x17FFF) != 0;
    let rounded = (x >> 16) + u32::from(round_up);
    (if nan { (x >> 16) | 0x40 } else { rounded }) as u16
}

fn to_bf16_bits_generic<const FMA: bool>(src: &[f32], dst: &mut [u16]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = bf16_bits(*s);
    }
}

dispatch!(
    /// `dst[i] = bf16 bits of src[i]` for the common length, as [`bf16_bits`], vectorised for
    /// the instruction set of `isa`.
    pub(crate) fn to_bf16_bits(src: &[f32], dst: &mut [u16]) => to_bf16_bits_generic
);

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// Every instruction set converts exactly as `half` does: rounding ties both ways, values
    /// next to the overflow to infinity, denormals, zeros, infinities and NaNs with payloads.
    #[test]
    fn bf16_conversion_is_halfs_bit_for_bit_on_every_isa() {
        let mut vals: Vec<f32> = vec![
            0.0,
            -0.0,
            f32::MIN_POSITIVE,
            f32::MIN_POSITIVE / 3.0,
            -1e-40,
            f32::MAX,
            f32::MIN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::from_bits(0x7FC0_0001),
            f32::from_bits(0xFF80_0001),
            f32::from_bits(0x7F80_8000),
            f32::from_bits(0x3F80_8000), // tie, even: stays
            f32::from_bits(0x3F81_8000), // tie, odd: rounds up
            f32::from_bits(0x3F80_8001),
            f32::from_bits(0x7F7F_FFFF),
        ];
        let mut s = 0x1234_5678u32;
        for _ in 0..4096 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            vals.push(f32::from_bits(s));
        }
        let want: Vec<u16> = vals.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        for isa in crate::cpu::Isa::supported() {
            let mut got = vec![0u16; vals.len()];
            to_bf16_bits(isa, &vals, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g, w, "{isa}: bf16 bits of {:#010x}", vals[i].to_bits());
            }
        }
    }
}
