//! The training step's elementwise loops compiled twice: for the baseline
//! x86-64 the crate is built for (SSE2, four lanes) and for AVX2 (eight),
//! chosen at run time by what the CPU has, so that one binary runs anywhere
//! and uses the wider registers where they exist. Only the instruction set
//! differs: no fused multiply-adds are formed (Rust does not contract
//! `a * b + c`), so both versions compute the same floats.

/// Defines `fn $name` that runs `$body` as AVX2 code when the CPU has AVX2,
/// and as baseline code otherwise.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2")]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: the CPU has the feature the function is compiled for.
                return unsafe { avx2($($arg),*) };
            }
            body($($arg),*)
        }
    };
}

pub(crate) use multiversion;

/// The machine's cores (cached: the standard library reads cgroup files on
/// every call).
pub fn threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}
