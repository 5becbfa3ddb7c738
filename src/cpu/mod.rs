//! The generic CPU kernels (GEMM, GELU, element-wise math) and the one place that decides which
//! instruction set they run on.
//!
//! Nothing here knows about tensors: the kernels take slices, and the operators of
//! [`crate::ops`] wrap them as Candle ops. Which kernels a model uses is a [`KernelPolicy`],
//! captured when the model is built (the environment only sets the default, see
//! [`KernelPolicy::from_env`]).
//!
//! What each kernel family runs on each instruction set:
//!
//! | family | AVX-512 (+BF16, +AMX) | AVX2 + FMA | NEON (aarch64) | portable |
//! |---|---|---|---|---|
//! | GEMM (`gemm.rs`: linear, MLP, dense conv) | 12 x 32 intrinsics (bf16: 8 x 32, `VDPBF16PS`; AMX: 32 x 32 tile blocks, `TDPBF16PS`, `amx.rs`) | 6 x 16 intrinsics | 6 x 16 intrinsics | 4 x 16 plain Rust, no FMA |
//! | GELU and its gradient (`gelu.rs`) | 16-lane table kernel (`gelu_table.rs`) | 8-lane table kernel | generic, FMA | generic, no FMA |
//! | LayerNorm, softmax, depthwise conv (`ops/`) | generic, FMA, AVX-512 codegen | generic, FMA, AVX2 codegen | generic, FMA | generic, no FMA |
//! | DCNv3/DCNv4 gather and scatter (`ops/dcnv3/cpu.rs`) | f32 forward: intrinsics (`cpu/avx512.rs`); f64 and backward: the AVX2 build | generic, FMA, AVX2 codegen | generic, FMA | generic, no FMA |
//!
//! "generic" kernels are plain loops over channel blocks, instantiated per instruction set by
//! `simd::dispatch!` (or the operator's own dispatch): on aarch64 NEON and FMA are baseline, so
//! the `FMA = true` instantiation is the NEON path (auto-vectorised to 128-bit `FMLA`), and the
//! portable one is the explicit fallback of CPUs without SIMD extensions. bf16 GEMM weights
//! exist only on AVX512_BF16 (and AMX); bf16 elsewhere (NEON included) computes in f32.

mod amx;
pub(crate) mod gelu;
#[cfg(target_arch = "x86_64")]
mod gelu_table;
pub(crate) mod gemm;
pub(crate) mod simd;

use candle_core::Result;
use std::fmt;

/// Runs `f` on a worker of the current rayon pool (the global one outside any pool) and returns
/// its result; runs it right here when this thread already is a pool worker.
///
/// A parallel loop started from a thread outside the pool is a job injected into the pool: the
/// starting thread sleeps on a latch until a worker wakes it, two context switches per loop
/// (tens of microseconds on a virtual machine). On a worker the same loop is a fork-join inside
/// the pool. So a computation with several parallel loops is best handed over once: the
/// network's forward passes and the DCNv3/DCNv4 operators do this themselves (measured on a
/// 2-vCPU Zen 4: T 224 batch 1 ~7%, the DCNv3 core at T's stage-3 shape 1.35x); wrap your own
/// sequence of operator calls likewise. Leave Candle's `Tensor::backward` on your thread: it
/// walks the graph recursively, which wants the main thread's stack rather than a worker's.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// [`on_pool`], with the pool's other workers kept awake while `f` runs, when nothing else
/// runs through this function: one job per other worker waits for work by polling the pool
/// (`rayon::yield_now`, running whatever work it finds) instead of going to sleep, until `f`
/// returns (or unwinds) or another call starts.
///
/// Between two parallel loops a rayon worker with nothing to do soon sleeps, and the next loop
/// then waits for the wake-up (a system call for the waker and tens of microseconds on a
/// virtual machine before the sleeper runs). A batch-1 forward of InternImage-T runs a few
/// hundred parallel loops, and on a 2-vCPU Zen 4 its second worker slept often enough that
/// keeping it polling made the forward ~2.5% faster (paired in one process). The price is a
/// core kept busy while `f` runs, as ONNX Runtime's and OpenMP's spinning thread pools do by
/// default: [`KernelPolicy::with_spin_wait`] turns it off. With concurrent calls (several
/// threads sharing a model) the workers have work anyway, and polling would only pull one
/// caller's work into another's wait, so the polling stops while more than one call runs.
/// The results are unchanged.
pub(crate) fn on_pool_spinning<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    /// Calls of this function running now, in the whole process.
    static RUNNING: AtomicUsize = AtomicUsize::new(0);
    /// Counts this call in `RUNNING` while alive, and sets the polling jobs' stop flag when
    /// dropped: after `f` returns, and when it unwinds (else the scope would wait for the
    /// polling jobs forever).
    struct Running<'a>(&'a AtomicBool);
    impl Drop for Running<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
            RUNNING.fetch_sub(1, Ordering::AcqRel);
        }
    }
    on_pool(|| {
        let done = AtomicBool::new(false);
        let running = Running(&done);
        let alone = RUNNING.fetch_add(1, Ordering::AcqRel) == 0;
        let others = rayon::current_num_threads().saturating_sub(1);
        if !alone || others == 0 {
            let out = f();
            drop(running);
            return out;
        }
        rayon::scope(|s| {
            for _ in 0..others {
                s.spawn(|_| {
                    while !done.load(Ordering::Acquire) && RUNNING.load(Ordering::Acquire) == 1 {
                        if rayon::yield_now() != Some(rayon::Yield::Executed) {
                            std::hint::spin_loop();
                        }
                    }
                });
            }
            let _running = running;
            f()
        })
    })
}

/// Writes `value` into every element of `s` and returns it as the initialised slice (a chunk of
/// a freshly allocated buffer, zeroed by the task that then fills it).
pub(crate) fn filled<T: Copy>(s: &mut [std::mem::MaybeUninit<T>], value: T) -> &mut [T] {
    for v in s.iter_mut() {
        v.write(value);
    }
    // SAFETY: every element was initialised just above, and `MaybeUninit<T>` has the size and
    // alignment of `T`.
    unsafe { &mut *(s as *mut [std::mem::MaybeUninit<T>] as *mut [T]) }
}

/// Copies `src` into the start of `dst` and returns what was written as an initialised slice
/// (the first `min(dst.len(), src.len())` elements): [`filled`] with values from a slice.
pub(crate) fn copied<'a, T: Copy>(
    dst: &'a mut [std::mem::MaybeUninit<T>],
    src: &[T],
) -> &'a mut [T] {
    let n = dst.len().min(src.len());
    for (d, &v) in dst[..n].iter_mut().zip(src) {
        d.write(v);
    }
    // SAFETY: the first `n` elements were initialised just above, and `MaybeUninit<T>` has the
    // size and alignment of `T`.
    unsafe { &mut *(&mut dst[..n] as *mut [std::mem::MaybeUninit<T>] as *mut [T]) }
}

/// `&mut [f32]` as the `MaybeUninit` output slice the CPU kernels write into.
pub(crate) fn as_out(s: &mut [f32]) -> &mut [std::mem::MaybeUninit<f32>] {
    // SAFETY: `MaybeUninit<f32>` has the layout of `f32`; the kernels given this slice only
    // write initialised values into it (never `MaybeUninit::uninit()`), so `s` stays initialised.
    unsafe { &mut *(s as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) }
}

/// A CPU instruction set the kernels have a path for, from the most portable to the widest.
///
/// On x86-64 the order is `Portable < Avx2 < Avx512 < Avx512Bf16 < Amx`: each level includes
/// the previous ones. `Neon` is the aarch64 path (baseline on that architecture).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Plain Rust, auto-vectorised for the build's baseline target: runs on any CPU.
    Portable,
    /// x86-64 with AVX2 and FMA (256-bit vectors).
    Avx2,
    /// x86-64 with AVX-512 F/BW/VL/DQ (512-bit vectors), plus AVX2 and FMA.
    Avx512,
    /// [`Isa::Avx512`] plus AVX512_BF16 (`VDPBF16PS`): bf16 weights with f32 accumulation.
    Avx512Bf16,
    /// [`Isa::Avx512Bf16`] plus AMX-TILE and AMX-BF16 (Intel Xeon from Sapphire Rapids on),
    /// with the operating system's permission to use the tile state (on Linux requested once,
    /// when the CPU is first probed; other OSes: not detected): the bf16 GEMMs run on the tile
    /// unit (`TDPBF16PS`, f32 accumulation); everything else as on [`Isa::Avx512Bf16`].
    Amx,
    /// aarch64 with NEON (128-bit vectors, fused multiply-add).
    Neon,
}

impl Isa {
    /// Every variant, most portable first.
    pub const ALL: [Isa; 6] = [
        Isa::Portable,
        Isa::Avx2,
        Isa::Avx512,
        Isa::Avx512Bf16,
        Isa::Amx,
        Isa::Neon,
    ];

    /// The name used by `INTERNIMAGE_ISA` and in messages: `portable`, `avx2`, `avx512`,
    /// `avx512bf16`, `amx`, `neon`.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Amx => "amx",
            Isa::Neon => "neon",
        }
    }

    /// Parses a [`Isa::name`] (case-insensitive; `-` and `_` are ignored).
    pub fn parse(s: &str) -> Result<Self> {
        let key: String = s
            .chars()
            .filter(|c| !matches!(c, '-' | '_'))
            .collect::<String>()
            .to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|isa| isa.name() == key)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|i| i.name()).collect();
                candle_core::Error::msg(format!(
                    "unknown instruction set {s:?}; expected one of {}",
                    names.join(", ")
                ))
            })
    }

    /// Whether the running CPU can execute this path (detected once, then a cached bit test).
    pub fn is_supported(self) -> bool {
        static SUPPORTED: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
        let mask = SUPPORTED.get_or_init(|| {
            Self::ALL
                .iter()
                .enumerate()
                .filter(|(_, isa)| isa.detect_now())
                .fold(0u8, |m, (i, _)| m | (1 << i))
        });
        mask & (1 << self as u8) != 0
    }

    fn detect_now(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::avx2(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::avx512(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => x86::avx512_bf16(),
            #[cfg(target_arch = "x86_64")]
            Isa::Amx => x86::avx512_bf16() && amx::detect(),
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The widest path the running CPU supports.
    pub fn detect() -> Self {
        Self::ALL
            .into_iter()
            .rev()
            .find(|isa| isa.is_supported())
            .unwrap_or(Isa::Portable)
    }

    /// Every path the running CPU supports, most portable first (the tests run each).
    pub fn supported() -> Vec<Self> {
        Self::ALL
            .into_iter()
            .filter(|isa| isa.is_supported())
            .collect()
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::is_x86_feature_detected as has;

    pub(super) fn avx2() -> bool {
        has!("avx2") && has!("fma")
    }

    pub(super) fn avx512() -> bool {
        avx2() && has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512dq")
    }

    pub(super) fn avx512_bf16() -> bool {
        avx512() && has!("avx512bf16")
    }
}

/// Which CPU kernels a model runs, captured when it is built.
///
/// * [`KernelPolicy::fast`] (the default): this crate's kernels on the widest instruction set
///   the CPU supports.
/// * [`KernelPolicy::with_isa`]: the same kernels on one given instruction set (for example
///   `Isa::Avx2` on an AVX-512 machine, or `Isa::Portable` to test the path CPUs without SIMD
///   extensions take). Asking for a set the CPU lacks is an error.
/// * [`KernelPolicy::reference`]: Candle's generic tensor ops wherever a fast kernel exists
///   (benchmark baselines and debugging).
/// * [`KernelPolicy::with_spin_wait`] (any of the above): whether a single-image forward keeps
///   the rayon pool's other workers polling for work between its parallel loops (the default)
///   or lets them sleep.
///
/// Every policy gives the same results within the fixture tolerances and keeps every gradient:
/// a tensor that tracks a gradient always takes a differentiable path. GPUs ignore the policy.
///
/// ```
/// use internimage::{Isa, KernelPolicy};
/// let fast = KernelPolicy::fast();
/// assert!(fast.isa().is_supported());
/// let portable = KernelPolicy::with_isa(Isa::Portable).unwrap();
/// assert_eq!(portable.isa(), Isa::Portable);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KernelPolicy {
    isa: Isa,
    reference: bool,
    /// Pack the GEMM weights as bf16 (for `VDPBF16PS`) even when they are given as f32: set by
    /// the model for a bf16 network run with f32 activations on AVX512_BF16.
    bf16_gemm_weights: bool,
    /// Keep the pool's other workers polling for work during a single-image forward instead of
    /// sleeping between its parallel loops (see [`KernelPolicy::with_spin_wait`]).
    spin_wait: bool,
}

/// The environment variable that selects [`KernelPolicy::reference`] (any value but empty or
/// `0`).
pub const ENV_REFERENCE_OPS: &str = "INTERNIMAGE_REFERENCE_OPS";
/// The environment variable that selects [`KernelPolicy::with_isa`] (an [`Isa::name`]).
pub const ENV_ISA: &str = "INTERNIMAGE_ISA";
/// The environment variable that turns [`KernelPolicy::with_spin_wait`] off (`0`).
pub const ENV_SPIN_WAIT: &str = "INTERNIMAGE_SPIN_WAIT";

impl KernelPolicy {
    /// This crate's kernels on the widest instruction set of the running CPU.
    pub fn fast() -> Self {
        Self {
            isa: Isa::detect(),
            reference: false,
            bf16_gemm_weights: false,
            spin_wait: true,
        }
    }

    /// This crate's kernels on `isa`; an error naming both when the CPU lacks it.
    pub fn with_isa(isa: Isa) -> Result<Self> {
        if !isa.is_supported() {
            candle_core::bail!(
                "the kernel policy asks for the {isa} instruction set, but this CPU supports {} \
                 (widest: {}); pick one of those, or leave {ENV_ISA} unset",
                Isa::supported()
                    .iter()
                    .map(|i| i.name())
                    .collect::<Vec<_>>()
                    .join(", "),
                Isa::detect()
            )
        }
        Ok(Self {
            isa,
            reference: false,
            bf16_gemm_weights: false,
            spin_wait: true,
        })
    }

    /// Candle's generic ops wherever this crate has a fast kernel.
    pub fn reference() -> Self {
        Self {
            isa: Isa::Portable,
            reference: true,
            bf16_gemm_weights: false,
            spin_wait: true,
        }
    }

    /// The default from the environment: [`KernelPolicy::reference`] when
    /// `INTERNIMAGE_REFERENCE_OPS` is set (to anything but `0`), else
    /// [`KernelPolicy::with_isa`] of `INTERNIMAGE_ISA` when set, else [`KernelPolicy::fast`];
    /// spin-waiting off when `INTERNIMAGE_SPIN_WAIT=0`. Reads the environment each time it is
    /// called. The constructors without a policy argument
    /// (`InternImage::new`, `from_checkpoint`, the free functions of [`crate::ops`]) use the
    /// process default instead: this function's result at the first such call, kept for the
    /// life of the process; pass a policy (`*_with_policy`) to choose per model.
    pub fn from_env() -> Result<Self> {
        let reference =
            std::env::var_os(ENV_REFERENCE_OPS).is_some_and(|v| !v.is_empty() && v != "0");
        let policy = if reference {
            Self::reference()
        } else {
            match std::env::var(ENV_ISA) {
                Ok(name) if !name.trim().is_empty() => Self::with_isa(Isa::parse(name.trim())?)
                    .map_err(|e| candle_core::Error::msg(format!("{ENV_ISA}={name}: {e}")))?,
                _ => Self::fast(),
            }
        };
        let spin_wait = spin_wait_setting(std::env::var(ENV_SPIN_WAIT).ok().as_deref())?;
        Ok(policy.with_spin_wait(spin_wait))
    }

    /// This policy with spin-waiting on (the default) or off. On, a single-image forward keeps
    /// the rayon pool's other workers polling for work between its parallel loops instead of
    /// letting them sleep (they would have to be woken for the next loop): ~2.5% faster for
    /// InternImage-T at batch 1 on a 2-vCPU machine, for a core kept busy during the forward,
    /// as ONNX Runtime's thread pool does by default. Off, they sleep. Results are the same
    /// either way; batches of two or more images and gradient-tracking forwards never spin.
    /// `INTERNIMAGE_SPIN_WAIT=0` turns it off in [`KernelPolicy::from_env`].
    pub fn with_spin_wait(self, on: bool) -> Self {
        Self {
            spin_wait: on,
            ..self
        }
    }

    /// Whether a single-image forward keeps the pool's workers polling (see
    /// [`KernelPolicy::with_spin_wait`]).
    pub fn spin_wait(&self) -> bool {
        self.spin_wait
    }

    /// The instruction set of the fast kernels ([`Isa::Portable`] for the reference policy).
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Whether Candle's generic ops replace the fast kernels.
    pub fn is_reference(&self) -> bool {
        self.reference
    }

    /// This policy with the GEMM weights packed as bf16 (products of bf16 pairs accumulated in
    /// f32) whatever dtype they are given in; only where the fast kernels run on AVX512_BF16 or
    /// AMX, otherwise the policy unchanged.
    pub(crate) fn with_bf16_gemm_weights(self) -> Self {
        Self {
            bf16_gemm_weights: !self.reference && self.has_bf16_gemm(),
            ..self
        }
    }

    /// Whether the fast kernels have a bf16 GEMM (bf16 weights, f32 accumulation) here:
    /// `TDPBF16PS` on [`Isa::Amx`], `VDPBF16PS` on [`Isa::Avx512Bf16`].
    pub(crate) fn has_bf16_gemm(&self) -> bool {
        !self.reference && matches!(self.isa, Isa::Avx512Bf16 | Isa::Amx)
    }

    /// Whether the GEMM weights are packed as bf16 (see [`KernelPolicy::with_bf16_gemm_weights`]).
    pub(crate) fn bf16_gemm_weights(&self) -> bool {
        self.bf16_gemm_weights
    }

    /// Whether the fast kernels run (not the reference policy).
    pub(crate) fn is_fast(&self) -> bool {
        !self.reference
    }

    /// The process default for the free functions of [`crate::ops`] that take no policy: read
    /// from the environment once, at the first call.
    pub(crate) fn process_default() -> Result<Self> {
        static DEFAULT: std::sync::OnceLock<std::result::Result<KernelPolicy, String>> =
            std::sync::OnceLock::new();
        DEFAULT
            .get_or_init(|| Self::from_env().map_err(|e| e.to_string()))
            .clone()
            .map_err(candle_core::Error::msg)
    }
}

/// The spin-wait setting of `INTERNIMAGE_SPIN_WAIT`'s value: on when unset, empty or `1`, off
/// for `0`, an error naming the choices otherwise.
fn spin_wait_setting(value: Option<&str>) -> Result<bool> {
    match value.map(str::trim) {
        None | Some("") | Some("1") => Ok(true),
        Some("0") => Ok(false),
        Some(other) => candle_core::bail!(
            "{ENV_SPIN_WAIT}={other}: expected 0 (workers sleep between parallel loops) or 1 \
             (the default: they poll for work during a single-image forward)"
        ),
    }
}

impl Default for KernelPolicy {
    /// [`KernelPolicy::fast`].
    fn default() -> Self {
        Self::fast()
    }
}

impl fmt::Display for KernelPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.reference {
            f.write_str("reference")?;
        } else {
            write!(f, "fast ({})", self.isa)?;
            if self.bf16_gemm_weights {
                f.write_str(" with bf16 GEMM weights")?;
            }
            // Which bf16 GEMM a bf16 model gets under this policy.
            match self.isa {
                Isa::Amx => f.write_str(" (bf16 GEMM: AMX TDPBF16PS)")?,
                Isa::Avx512Bf16 => f.write_str(" (bf16 GEMM: AVX512_BF16 VDPBF16PS)")?,
                _ => {}
            }
        }
        if !self.spin_wait {
            f.write_str(", no spin-wait")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_pool_spinning_returns_and_lets_parallel_loops_finish() {
        use rayon::prelude::*;
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            // From a thread outside any pool (handed to a worker of the global pool) and from
            // a worker of `pool` (run there).
            for inside in [false, true] {
                let run = || {
                    on_pool_spinning(|| {
                        let on_worker = rayon::current_thread_index().is_some();
                        let sum: u64 = (0..10_000u64).into_par_iter().sum();
                        // A second loop after the first, as a forward's operators run.
                        let max = (0..10_000u64).into_par_iter().max();
                        (on_worker, sum, max)
                    })
                };
                let got = if inside {
                    pool.install(run)
                } else {
                    pool.install(|| std::thread::scope(|s| s.spawn(run).join().unwrap()))
                };
                assert_eq!(got, (true, 49_995_000, Some(9_999)), "{threads} threads");
            }
        }
    }

    #[test]
    fn on_pool_spinning_passes_a_panic_on_instead_of_waiting_forever() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        let caught = pool.install(|| {
            std::panic::catch_unwind(|| on_pool_spinning(|| -> u32 { panic!("inside") }))
        });
        assert!(caught.is_err());
        // The pool still runs work afterwards (the polling jobs ended).
        assert_eq!(pool.install(|| on_pool_spinning(|| 5)), 5);
    }

    #[test]
    fn spin_wait_setting_reads_0_and_1_and_rejects_the_rest() {
        assert!(spin_wait_setting(None).unwrap());
        assert!(spin_wait_setting(Some("")).unwrap());
        assert!(spin_wait_setting(Some(" 1 ")).unwrap());
        assert!(!spin_wait_setting(Some("0")).unwrap());
        let err = spin_wait_setting(Some("yes")).unwrap_err().to_string();
        assert!(
            err.contains("INTERNIMAGE_SPIN_WAIT=yes") && err.contains("expected 0"),
            "{err}"
        );
        let fast = KernelPolicy::fast();
        assert!(fast.spin_wait());
        assert!(!fast.with_spin_wait(false).spin_wait());
        assert_eq!(fast.with_spin_wait(false).with_spin_wait(true), fast);
        assert!(fast
            .with_spin_wait(false)
            .to_string()
            .ends_with(", no spin-wait"));
        assert!(!fast.to_string().contains("spin"));
    }

    #[test]
    fn on_pool_runs_on_a_worker_and_inline_on_one() {
        // From a thread outside any pool: on a worker of the global pool, result handed back.
        let outside = std::thread::spawn(|| {
            assert_eq!(rayon::current_thread_index(), None);
            on_pool(|| (rayon::current_thread_index(), 7))
        })
        .join()
        .unwrap();
        assert!(outside.0.is_some());
        assert_eq!(outside.1, 7);
        // On a worker of another pool: right there, on that worker (no hand-off to the global
        // pool), and a parallel loop inside still completes.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let (here, inner, sum) = pool.install(|| {
            let here = std::thread::current().id();
            on_pool(|| {
                use rayon::prelude::*;
                let sum: u64 = (0..1000u64).into_par_iter().sum();
                (here, std::thread::current().id(), sum)
            })
        });
        assert_eq!(here, inner);
        assert_eq!(sum, 499_500);
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_errors() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()).unwrap(), isa);
        }
        assert_eq!(Isa::parse("AVX-512_BF16").unwrap(), Isa::Avx512Bf16);
        assert_eq!(Isa::parse("AMX").unwrap(), Isa::Amx);
        let err = Isa::parse("sse9").unwrap_err().to_string();
        assert!(err.contains("sse9") && err.contains("avx2"), "{err}");
    }

    #[test]
    fn unsupported_isa_is_an_error_naming_both() {
        let missing = Isa::ALL.into_iter().find(|i| !i.is_supported());
        // Neon on x86-64, the x86 sets on aarch64: there is always one.
        let missing = missing.expect("some instruction set is foreign to this CPU");
        let err = KernelPolicy::with_isa(missing).unwrap_err().to_string();
        assert!(err.contains(missing.name()), "{err}");
        assert!(err.contains(Isa::detect().name()), "{err}");
    }

    /// On aarch64 NEON is detected, and it is the fast (widest) set: the policies of a model
    /// built there run the NEON kernels; the x86 sets are foreign.
    #[cfg(target_arch = "aarch64")]
    #[test]
    fn neon_is_detected_and_is_the_fast_isa_on_aarch64() {
        assert!(Isa::Neon.is_supported());
        assert_eq!(Isa::detect(), Isa::Neon);
        assert_eq!(Isa::supported(), vec![Isa::Portable, Isa::Neon]);
        assert_eq!(KernelPolicy::fast().isa(), Isa::Neon);
        assert_eq!(KernelPolicy::with_isa(Isa::Neon).unwrap().isa(), Isa::Neon);
        for isa in [Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16] {
            assert!(!isa.is_supported(), "{isa} on aarch64");
            let err = KernelPolicy::with_isa(isa).unwrap_err().to_string();
            assert!(err.contains(isa.name()) && err.contains("neon"), "{err}");
        }
        // bf16 GEMM weights are an AVX512_BF16 feature: a NEON policy keeps f32 weights.
        assert!(!KernelPolicy::fast()
            .with_bf16_gemm_weights()
            .bf16_gemm_weights());
    }

    /// On x86-64 NEON is never supported, never the fast set, and asking for it is an error.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn neon_is_not_supported_on_x86_64() {
        assert!(!Isa::Neon.is_supported());
        assert_ne!(Isa::detect(), Isa::Neon);
        assert!(!Isa::supported().contains(&Isa::Neon));
        assert_ne!(KernelPolicy::fast().isa(), Isa::Neon);
        let err = KernelPolicy::with_isa(Isa::Neon).unwrap_err().to_string();
        assert!(err.contains("neon"), "{err}");
    }

    #[test]
    fn detection_is_consistent() {
        let best = Isa::detect();
        assert!(best.is_supported() && Isa::Portable.is_supported());
        assert!(Isa::supported().contains(&best));
        assert_eq!(KernelPolicy::fast().isa(), best);
        assert!(KernelPolicy::reference().is_reference());
    }

    /// AMX implies AVX512_BF16 (the kernels convert with it), and a policy capped below AMX
    /// never packs for it; the policy says which bf16 GEMM runs.
    #[test]
    fn amx_is_above_avx512_bf16_and_named_by_the_policy() {
        if Isa::Amx.is_supported() {
            assert!(Isa::Avx512Bf16.is_supported());
            assert_eq!(Isa::detect(), Isa::Amx);
            let p = KernelPolicy::with_isa(Isa::Amx)
                .unwrap()
                .with_bf16_gemm_weights();
            assert!(p.bf16_gemm_weights());
            assert!(p.to_string().contains("AMX"), "{p}");
        } else {
            println!("note: this CPU (or OS) has no usable AMX; the AMX path is not exercised");
        }
        if Isa::Avx512Bf16.is_supported() {
            let p = KernelPolicy::with_isa(Isa::Avx512Bf16).unwrap();
            assert!(p.to_string().contains("VDPBF16PS") && !p.to_string().contains("AMX"));
        }
        assert!(!KernelPolicy::reference().has_bf16_gemm());
    }
}
