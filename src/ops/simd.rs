//! Small helpers for the auto-vectorised CPU kernels.
//!
//! The kernels are written as plain loops over contiguous `f32` slices and instantiated twice:
//! once for the baseline target and, on x86-64, once inside a `#[target_feature(enable = "avx2,fma")]`
//! function chosen at run time, so that release builds without `-C target-cpu=native` still get
//! 256-bit vectors and fused multiply-adds.

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

/// True when the environment variable `INTERNIMAGE_REFERENCE_OPS` is set (to anything but `0`)
/// at the first call: the fast CPU kernels then defer to candle's generic ops (exact GELU via
/// `Tensor::gelu_erf`, depthwise conv via the grouped `conv2d` on NCHW). Benchmark baselines and
/// debugging only.
pub(crate) fn reference_ops() -> bool {
    static FLAG: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FLAG.get_or_init(|| {
        std::env::var_os("INTERNIMAGE_REFERENCE_OPS").is_some_and(|v| !v.is_empty() && v != "0")
    })
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

/// Whether the running CPU supports AVX2 and FMA (cached by the standard library).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Defines `$name(args)` that runs `$generic::<true>(args)` in an AVX2+FMA-enabled function when
/// the CPU has them (x86-64), `$generic::<true>` on aarch64 (FMA is baseline there) and
/// `$generic::<false>` elsewhere.
///
/// With `=> $generic, avx2: $fast`, a hand-written kernel (`unsafe fn` of the same signature,
/// compiled for AVX2+FMA) takes the place of `$generic::<true>` on x86-64.
macro_rules! dispatch_fma {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) => $generic:ident) => {
        $crate::ops::simd::dispatch_fma!(@define $(#[$m])* $vis fn $name($($arg: $ty),*) => $generic, {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn fast($($arg: $ty),*) {
                $generic::<true>($($arg),*)
            }
            fast
        });
    };
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) => $generic:ident, avx2: $fast:path) => {
        $crate::ops::simd::dispatch_fma!(@define $(#[$m])* $vis fn $name($($arg: $ty),*) => $generic, { $fast });
    };
    (@define $(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) => $generic:ident, $fast:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                if $crate::ops::simd::has_avx2_fma() {
                    // SAFETY: the CPU supports AVX2 and FMA, the features the fast kernel was
                    // compiled for; the arguments are passed on unchanged.
                    unsafe { ($fast)($($arg),*) };
                    return;
                }
                $generic::<false>($($arg),*)
            }
            #[cfg(target_arch = "aarch64")]
            {
                $generic::<true>($($arg),*)
            }
            #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
            {
                $generic::<false>($($arg),*)
            }
        }
    };
}
pub(crate) use dispatch_fma;
