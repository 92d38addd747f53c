//! Backends and devices. Tests and the default run use the CPU backend (`flex`);
//! the `cuda` feature adds NVIDIA GPUs.

use anyhow::{bail, Result};

/// The CPU backend.
pub type Cpu = burn::backend::Flex;
pub type CpuDevice = burn::backend::flex::FlexDevice;
/// The CPU backend with automatic differentiation, for training.
pub type CpuAutodiff = burn::backend::Autodiff<Cpu>;

#[cfg(feature = "cuda")]
pub type Cuda = burn::backend::Cuda;

/// Keeps the memory a training step frees for the next step instead of handing it back to the
/// system. Left to itself, glibc maps most tensors of a small model's step fresh and unmaps
/// them on free, or trims the heap behind them, so a CPU step spends a fifth of its time
/// faulting in and zeroing pages (BENCHMARKS.md: the on-policy warm-up ran 1.25x faster, its
/// peak resident memory 2% higher). Blocks up to 32 MiB (glibc's own ceiling for its sliding
/// threshold) come from the heap, and up to 64 MiB of free heap is kept. Call it first thing in
/// `main`; glibc only, and a `GLIBC_TUNABLES` the user set wins.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        // Safety: mallopt only sets the allocator's thresholds; called before other threads.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        }
    }
}

/// Runs `work` on a thread of the global thread pool (on this thread when it is one). The CPU
/// backend's parallel kernels, called from outside the pool, each hand their job to the pool
/// and sleep until it is done; called from a pool thread, they share the work with the other
/// threads directly. Generation ran 1.12-1.37x faster so on the 2-core machine (BENCHMARKS.md).
pub fn on_a_pool_thread<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    match rayon::current_thread_index() {
        Some(_) => work(),
        None => rayon::scope(|_| work()),
    }
}

/// A device named on the command line: `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl DeviceSpec {
    /// The device a benchmark was asked for: its first argument that is not a flag
    /// (`cargo bench -p trainer --features cuda --bench NAME -- cuda`), else the CPU.
    pub fn from_bench_args() -> Self {
        std::env::args()
            .skip(1)
            .find(|a| !a.starts_with('-'))
            .map(|a| Self::parse(&a).expect("a device: cpu, cuda or cuda:N"))
            .unwrap_or(Self::Cpu)
    }

    pub fn parse(text: &str) -> Result<Self> {
        let text = text.trim().to_ascii_lowercase();
        if text == "cpu" {
            return Ok(Self::Cpu);
        }
        if text == "cuda" {
            return Ok(Self::Cuda(0));
        }
        if let Some(index) = text.strip_prefix("cuda:") {
            if let Ok(index) = index.parse() {
                return Ok(Self::Cuda(index));
            }
        }
        bail!("unknown device `{text}` (expected cpu, cuda or cuda:N)")
    }

    /// Fails with a clear message when the device needs a feature this binary lacks, or a
    /// driver this machine lacks.
    pub fn ensure_available(self) -> Result<Self> {
        if let Self::Cuda(index) = self {
            if !cfg!(feature = "cuda") {
                bail!(
                    "this trainer binary was built without CUDA support; rebuild with \
                     `cargo build --release --features cuda`"
                );
            }
            if !cuda_driver_present() {
                bail!(
                    "device cuda:{index} was asked for, but no NVIDIA driver was found on this \
                     machine (libcuda.so.1 cannot be loaded); install the driver, or use the CPU \
                     (`--device cpu`; in a recipe, `--set run.device=cpu`)"
                );
            }
        }
        Ok(self)
    }
}

/// Whether the NVIDIA driver library loads (Burn would panic deep inside without it).
#[cfg(feature = "cuda")]
fn cuda_driver_present() -> bool {
    ["libcuda.so.1", "libcuda.so", "nvcuda.dll"]
        .into_iter()
        .any(|name| {
            // SAFETY: loading the driver library runs its initialisers, as Burn itself would.
            unsafe { libloading::Library::new(name) }.is_ok()
        })
}

#[cfg(not(feature = "cuda"))]
fn cuda_driver_present() -> bool {
    false
}

/// Runs `$body` with `B` bound to the backend of `$spec` and `device` to its device.
/// Keeps generic code generic while the command line picks the hardware at run time.
/// (Two definitions: a `cfg` inside a macro body would be read in the calling crate.)
#[cfg(feature = "cuda")]
#[macro_export]
macro_rules! with_backend {
    ($spec:expr, |$B:ident, $device:ident| $body:expr) => {{
        match $spec {
            $crate::backend::DeviceSpec::Cpu => {
                type $B = $crate::backend::Cpu;
                let $device = $crate::backend::CpuDevice::default();
                $body
            }
            $crate::backend::DeviceSpec::Cuda(index) => {
                type $B = $crate::backend::Cuda;
                let $device = burn::backend::cuda::CudaDevice::new(index);
                $body
            }
        }
    }};
}

/// Runs `$body` with `B` bound to the backend of `$spec` and `device` to its device.
/// This build has no CUDA: asking for it is an error.
#[cfg(not(feature = "cuda"))]
#[macro_export]
macro_rules! with_backend {
    ($spec:expr, |$B:ident, $device:ident| $body:expr) => {{
        match $spec {
            $crate::backend::DeviceSpec::Cpu => {
                type $B = $crate::backend::Cpu;
                let $device = $crate::backend::CpuDevice::default();
                $body
            }
            spec @ $crate::backend::DeviceSpec::Cuda(_) => {
                spec.ensure_available()?;
                unreachable!()
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_rejects_junk() {
        assert_eq!(DeviceSpec::parse("cpu").unwrap(), DeviceSpec::Cpu);
        assert_eq!(DeviceSpec::parse("CUDA").unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(DeviceSpec::parse("cuda:3").unwrap(), DeviceSpec::Cuda(3));
        let err = DeviceSpec::parse("tpu").unwrap_err().to_string();
        assert!(err.contains("tpu"), "{err}");
        assert!(DeviceSpec::parse("cuda:x").is_err());
    }
}
