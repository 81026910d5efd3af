//! The instruction sets kiln's own CPU kernels use: the host's, capped by
//! `KILN_CPU` (read once per process) so that one machine runs the code
//! paths of older ones, as tests do:
//!
//! - `avx2`: no AVX-512 and no AMX (kiln's packed GEMM, norms, softmax
//!   passes and epilogues, and the tile unit, stay off: products go to the
//!   `gemm` crate and the generated kernels, as on an AVX2 host); Cranelift
//!   emits no AVX-512 encodings.
//! - `baseline`: besides, no AVX, AVX2 or FMA in kiln's kernels
//!   (Cranelift's SSE code, multiply and add rounded apart).
//!
//! The `gemm` crate chooses its own kernels from the host, and the `half`
//! crate's slice conversions (16-bit weights widened for it) use F16C where
//! the host has it: the cap is on kiln's own code.

use std::sync::OnceLock;

/// The most kiln's kernels may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// SSE4.2 at most; no FMA.
    Baseline,
    /// AVX2 and FMA at most.
    Avx2,
    /// Whatever the host has.
    Host,
}

impl Level {
    /// The name `KILN_CPU` takes.
    pub fn name(self) -> &'static str {
        match self {
            Level::Baseline => "baseline",
            Level::Avx2 => "avx2",
            Level::Host => "host",
        }
    }
}

/// The cap `KILN_CPU` sets; an unknown value is said on stderr once and
/// leaves the host's sets.
pub fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| match std::env::var("KILN_CPU") {
        Err(_) => Level::Host,
        Ok(v) => match v.as_str() {
            "" | "host" | "native" => Level::Host,
            "avx2" => Level::Avx2,
            "baseline" => Level::Baseline,
            other => {
                eprintln!(
                    "kiln: warning: KILN_CPU={other:?} is not one of host, avx2, baseline; \
                     kiln uses every instruction set of the host"
                );
                Level::Host
            }
        },
    })
}

/// Whether kiln's kernels may use `feature` (a name of
/// `is_x86_feature_detected!`: `avx512f`, `avx512bw`, `avx512bf16`,
/// `avx2`, `fma`): the host has it and the cap allows it.
pub(crate) fn has(feature: Feature) -> bool {
    let allowed = match feature {
        Feature::Avx512f | Feature::Avx512bw | Feature::Avx512bf16 => Level::Host,
        Feature::Avx2 | Feature::Fma => Level::Avx2,
    };
    if level() < allowed {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        match feature {
            Feature::Avx512f => std::arch::is_x86_feature_detected!("avx512f"),
            Feature::Avx512bw => std::arch::is_x86_feature_detected!("avx512bw"),
            Feature::Avx512bf16 => std::arch::is_x86_feature_detected!("avx512bf16"),
            Feature::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            Feature::Fma => std::arch::is_x86_feature_detected!("fma"),
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        // Every aarch64 core fuses multiply and add.
        feature == Feature::Fma
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// The instruction sets [`has`] asks about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Feature {
    Avx512f,
    Avx512bw,
    Avx512bf16,
    Avx2,
    Fma,
}

/// The Cranelift settings the cap turns off (x86-64 flag names), set on the
/// host's builder.
pub(crate) fn cranelift_disabled() -> &'static [&'static str] {
    const AVX512: [&str; 5] = [
        "has_avx512f",
        "has_avx512vl",
        "has_avx512dq",
        "has_avx512bitalg",
        "has_avx512vbmi",
    ];
    const BASELINE: [&str; 11] = [
        "has_avx512f",
        "has_avx512vl",
        "has_avx512dq",
        "has_avx512bitalg",
        "has_avx512vbmi",
        "has_avx",
        "has_avx2",
        "has_fma",
        "has_bmi1",
        "has_bmi2",
        "has_lzcnt",
    ];
    match level() {
        Level::Host => &[],
        Level::Avx2 => &AVX512,
        Level::Baseline => &BASELINE,
    }
}
