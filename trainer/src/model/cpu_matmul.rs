//! `x · wᵀ` on the CPU backend without autodiff — every linear layer of generation and
//! evaluation — with the weights stored as Hugging Face's `[out, in]`.
//!
//! Our own kernel because burn-flex's matrix product (the `gemm` crate) re-packs the whole
//! weight matrix on every call: at a decoding step's few rows that copy costs more than the
//! product (SmolLM2-135M's output head at 16 rows ran at 20 GFLOP/s), and over a prompt's
//! thousands of rows its kernels ran at 85-170 GFLOP/s where this one runs at 135-190 on the
//! same machine (BENCHMARKS.md, `matmul_shapes`). Each output is a dot product of a row of `x`
//! and a weight row, both read in place, in tiles of 4 rows of `x` by 4 weight rows in sixteen
//! AVX-512 lanes (3 by 4 in eight AVX2 lanes on CPUs without AVX-512); each task of the thread
//! pool covers a block of weight rows and a block of rows of `x` that stay in L2 together.
//! CPUs without AVX2 and FMA keep the backend's product. Each output is summed in one fixed
//! order whatever the thread split, so results repeat bit for bit on one machine. Other
//! backends and autodiff (training, where `cpu_fused::linear` writes the weight's gradient in
//! its own layout) keep their own product.

use burn::prelude::*;
use burn::tensor::TensorPrimitive;
use burn_flex::FlexTensor;
use rayon::prelude::*;
use std::any::{Any, TypeId};

/// Weight rows a task of the thread pool covers: at most this many (a few hundred KiB of
/// weights), and small enough that every thread gets about four tasks.
const MAX_BLOCK: usize = 256;
/// Bytes of `x` a task covers: with its weight rows they stay in L2 while the task runs.
const X_BLOCK_BYTES: usize = 128 << 10;
/// Below this many multiply-adds one thread does the product (the pool's wake-up costs more).
const PARALLEL_FROM: usize = 1 << 20;

/// `x[rows, in] · w[out, in]ᵀ` through the kernel when both are contiguous f32 tensors of the
/// CPU backend (not under autodiff); `None` otherwise.
pub fn matmul_transposed<B: Backend>(x: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Option<Tensor<B, 2>> {
    let [rows, k] = x.dims();
    let [n, k_w] = w.dims();
    // The backend is known from its type alone: other backends and autodiff leave here,
    // before any tensor is touched.
    let on_cpu_backend = TypeId::of::<B::FloatTensorPrimitive>() == TypeId::of::<FlexTensor>();
    if !on_cpu_backend || k != k_w {
        return None;
    }
    let (x_primitive, w_primitive) = (float_primitive(x)?, float_primitive(w)?);
    let x_flex = (&x_primitive as &dyn Any).downcast_ref::<FlexTensor>()?;
    let w_flex = (&w_primitive as &dyn Any).downcast_ref::<FlexTensor>()?;
    let x_values = x_flex.as_slice::<f32>()?;
    let w_values = w_flex.as_slice::<f32>()?;
    let y = product(x_values, w_values, rows, n, k)?;
    let y = FlexTensor::from_data(TensorData::new(y, [rows, n]));
    let y: Box<dyn Any> = Box::new(y);
    let y = *y.downcast::<B::FloatTensorPrimitive>().ok()?;
    Some(Tensor::from_primitive(TensorPrimitive::Float(y)))
}

fn float_primitive<B: Backend>(tensor: &Tensor<B, 2>) -> Option<B::FloatTensorPrimitive> {
    match tensor.clone().into_primitive() {
        TensorPrimitive::Float(primitive) => Some(primitive),
        TensorPrimitive::QFloat(_) => None,
    }
}

/// `y[i, j] = Σ_k x[i, k] · w[j, k]` for row-major `x` (`rows × k`), `w` (`n × k`), `y`
/// (`rows × n`); `None` where this CPU lacks AVX2 and FMA (the caller then uses the backend's).
pub fn product(x: &[f32], w: &[f32], rows: usize, n: usize, k: usize) -> Option<Vec<f32>> {
    let kernel = *Kernel::available().first()?;
    Some(product_with(kernel, x, w, rows, n, k))
}

/// Which instructions the kernel uses: AVX-512 where the CPU has it (sixteen lanes, and 32
/// registers for larger tiles), else AVX2 and FMA.
#[derive(Clone, Copy, Debug)]
enum Kernel {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    /// The kernels this CPU can run, fastest first.
    fn available() -> Vec<Kernel> {
        #[allow(unused_mut)] // nothing to add off x86-64
        let mut kernels = vec![];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") {
                kernels.push(Kernel::Avx512);
            }
            if has!("avx2") && has!("fma") {
                kernels.push(Kernel::Avx2);
            }
        }
        kernels
    }
}

/// [`product`] with `kernel`, which this CPU must be able to run.
fn product_with(kernel: Kernel, x: &[f32], w: &[f32], rows: usize, n: usize, k: usize) -> Vec<f32> {
    assert_eq!(x.len(), rows * k, "x: {rows} x {k}");
    assert_eq!(w.len(), n * k, "w: {n} x {k}");
    // Not zeroed first: the tiles write every output (zeros where k = 0).
    let mut y: Vec<f32> = Vec::with_capacity(rows * n);
    let out = OutPtr(y.as_mut_ptr());
    let threads = rayon::current_num_threads();
    let rows_per_block = n
        .div_ceil(4 * threads)
        .next_multiple_of(4)
        .clamp(4, MAX_BLOCK);
    let blocks = n.div_ceil(rows_per_block);
    let x_block = (X_BLOCK_BYTES / (4 * k.max(1)) / 4 * 4).max(4);
    let block = |task: usize| {
        let (row_block, b) = (task / blocks, task % blocks);
        let x_rows = row_block * x_block..((row_block + 1) * x_block).min(rows);
        let columns = b * rows_per_block..((b + 1) * rows_per_block).min(n);
        // Safety: the kernel's instructions are there (`Kernel::available`); each block
        // writes the outputs of its own weight rows only (disjoint columns of `y`), and `y`
        // outlives the loop.
        unsafe {
            match kernel {
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx512 => avx512::product_block(x, w, x_rows, n, k, columns, out.get()),
                #[cfg(target_arch = "x86_64")]
                Kernel::Avx2 => avx2::product_block(x, w, x_rows, n, k, columns, out.get()),
            }
        }
    };
    let tasks = rows.div_ceil(x_block) * blocks;
    if rows * n * k >= PARALLEL_FROM {
        (0..tasks).into_par_iter().for_each(block);
    } else {
        (0..tasks).for_each(block);
    }
    // Safety: the tasks' rows and columns cover all of `rows × n`, each output written once.
    unsafe { y.set_len(rows * n) };
    y
}

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// Safety: blocks write disjoint elements (see `product`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    // A method, so that closures capture the whole (Send) wrapper, not its raw pointer.
    fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Eight f32 lanes: one AVX2 register.
    const LANES: usize = 8;

    /// The outputs of weight rows `columns`, in tiles of up to 4 weight rows by 3 rows of `x`:
    /// 12 eight-lane accumulators, which with the loaded lanes fit AVX2's 16 registers.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn product_block(
        x: &[f32],
        w: &[f32],
        rows: Range<usize>,
        n: usize,
        k: usize,
        columns: Range<usize>,
        out: *mut f32,
    ) {
        let (x, w) = (x.as_ptr(), w.as_ptr());
        let mut j = columns.start;
        while j < columns.end {
            let width = (columns.end - j).min(4);
            let mut i = rows.start;
            while i < rows.end {
                let height = (rows.end - i).min(3);
                // Safety: the tiles stay inside x, w and y (the caller's shapes).
                unsafe {
                    match (height, width) {
                        (3, 4) => tile::<3, 4>(x, w, n, k, i, j, out),
                        (2, 4) => tile::<2, 4>(x, w, n, k, i, j, out),
                        (1, 4) => tile::<1, 4>(x, w, n, k, i, j, out),
                        (3, _) => (0..width).for_each(|c| tile::<3, 1>(x, w, n, k, i, j + c, out)),
                        (2, _) => (0..width).for_each(|c| tile::<2, 1>(x, w, n, k, i, j + c, out)),
                        _ => (0..width).for_each(|c| tile::<1, 1>(x, w, n, k, i, j + c, out)),
                    }
                }
                i += height;
            }
            j += width;
        }
    }

    /// Outputs `y[i..i+XR, j..j+WR]`: eight lanes of k at a time, then the lanes summed in one
    /// fixed order, then k's tail.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn tile<const XR: usize, const WR: usize>(
        x: *const f32,
        w: *const f32,
        n: usize,
        k: usize,
        i: usize,
        j: usize,
        out: *mut f32,
    ) {
        let mut acc = [[_mm256_setzero_ps(); WR]; XR];
        let mut t = 0;
        // Safety (every pointer below): rows i..i+XR of x and j..j+WR of w hold k values each.
        while t + LANES <= k {
            let mut wv = [_mm256_setzero_ps(); WR];
            for (c, lanes) in wv.iter_mut().enumerate() {
                *lanes = unsafe { _mm256_loadu_ps(w.add((j + c) * k + t)) };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let xv = unsafe { _mm256_loadu_ps(x.add((i + r) * k + t)) };
                for (sum, lanes) in row.iter_mut().zip(&wv) {
                    *sum = _mm256_fmadd_ps(xv, *lanes, *sum);
                }
            }
            t += LANES;
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, sum) in row.iter().enumerate() {
                let mut lanes = [0.0f32; LANES];
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *sum) };
                let mut total = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                    + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
                for tail in t..k {
                    let (a, b) =
                        unsafe { (*x.add((i + r) * k + tail), *w.add((j + c) * k + tail)) };
                    total = a.mul_add(b, total);
                }
                unsafe { *out.add((i + r) * n + j + c) = total };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Sixteen f32 lanes: one AVX-512 register.
    const LANES: usize = 16;

    /// The outputs of weight rows `columns`, in tiles of up to 4 rows of `x` by 4 weight rows:
    /// 16 sixteen-lane accumulators, the 8 loaded vectors beside them in the 32 registers,
    /// two multiply-adds for every load. (Each kernel walks its own tiles: walked from one
    /// shared loop through a closure, the tiles ran at half speed.)
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn product_block(
        x: &[f32],
        w: &[f32],
        rows: Range<usize>,
        n: usize,
        k: usize,
        columns: Range<usize>,
        out: *mut f32,
    ) {
        let (x, w) = (x.as_ptr(), w.as_ptr());
        let mut j = columns.start;
        while j < columns.end {
            let width = (columns.end - j).min(4);
            let first = rows.start;
            let mut i = first;
            while i < rows.end {
                let height = (rows.end - i).min(4);
                // Safety: the tiles stay inside x, w and y (the caller's shapes).
                unsafe {
                    match (height, width) {
                        (4, 4) => tile::<4, 4>(x, w, [n, k], [i, j], out, i == first),
                        (3, 4) => tile::<3, 4>(x, w, [n, k], [i, j], out, i == first),
                        (2, 4) => tile::<2, 4>(x, w, [n, k], [i, j], out, i == first),
                        (1, 4) => tile::<1, 4>(x, w, [n, k], [i, j], out, i == first),
                        (4, _) => (0..width)
                            .for_each(|c| tile::<4, 1>(x, w, [n, k], [i, j + c], out, false)),
                        (3, _) => (0..width)
                            .for_each(|c| tile::<3, 1>(x, w, [n, k], [i, j + c], out, false)),
                        (2, _) => (0..width)
                            .for_each(|c| tile::<2, 1>(x, w, [n, k], [i, j + c], out, false)),
                        _ => (0..width)
                            .for_each(|c| tile::<1, 1>(x, w, [n, k], [i, j + c], out, false)),
                    }
                }
                i += height;
            }
            j += width;
        }
    }

    /// Outputs `y[i..i+XR, j..j+WR]`: sixteen lanes of k at a time (the last chunk masked),
    /// then each accumulator's lanes summed in one fixed order. With `prefetch` (the first
    /// rows of x over these weight rows) the next weight rows are fetched meanwhile: decoding
    /// streams every weight matrix from memory once a step.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const XR: usize, const WR: usize>(
        x: *const f32,
        w: *const f32,
        [n, k]: [usize; 2],
        [i, j]: [usize; 2],
        out: *mut f32,
        prefetch: bool,
    ) {
        let mut acc = [[_mm512_setzero_ps(); WR]; XR];
        let mut t = 0;
        // Safety (every pointer below): rows i..i+XR of x and j..j+WR of w hold k values
        // each; the masked load reads only the lanes below k.
        let mut step = |t: usize, mask: __mmask16| {
            if prefetch {
                for c in 0..WR {
                    let next = w.wrapping_add((j + WR + c) * k + t);
                    _mm_prefetch::<_MM_HINT_T0>(next.cast());
                }
            }
            let mut wv = [_mm512_setzero_ps(); WR];
            for (c, lanes) in wv.iter_mut().enumerate() {
                *lanes = unsafe { _mm512_maskz_loadu_ps(mask, w.add((j + c) * k + t)) };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let xv = unsafe { _mm512_maskz_loadu_ps(mask, x.add((i + r) * k + t)) };
                for (sum, lanes) in row.iter_mut().zip(&wv) {
                    *sum = _mm512_fmadd_ps(xv, *lanes, *sum);
                }
            }
        };
        while t + LANES <= k {
            step(t, 0xFFFF);
            t += LANES;
        }
        if t < k {
            step(t, (1u16 << (k - t)) - 1);
        }
        for (r, row) in acc.iter().enumerate() {
            for (c, sum) in row.iter().enumerate() {
                unsafe { *out.add((i + r) * n + j + c) = _mm512_reduce_add_ps(*sum) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Cpu, CpuAutodiff};

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0) - 1.0)
            .collect()
    }

    fn reference(x: &[f32], w: &[f32], rows: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0.0f64; rows * n];
        for i in 0..rows {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                    .sum();
            }
        }
        y.into_iter().map(|v| v as f32).collect()
    }

    #[test]
    fn agrees_with_a_plain_product_on_every_tile_shape_and_tail() {
        // Rows 1..=7 cover every tile height (up to 3 rows in AVX2, 4 in AVX-512); n = 259
        // several blocks and a ragged last tile; k = 43 and 1029 a tail after the eight- or
        // sixteen-lane chunks, k = 3 nothing but a tail, k = 0 outputs of zeros; the large
        // cases run on the pool, 130 rows of 300 in two blocks of rows.
        for (rows, n, k) in [
            (2, 3, 0),
            (1, 5, 3),
            (2, 9, 8),
            (3, 4, 16),
            (5, 259, 43),
            (6, 7, 17),
            (7, 130, 1029),
            (130, 37, 300),
        ] {
            let (x, w) = (values(rows * k, 1), values(n * k, 2));
            let want = reference(&x, &w, rows, n, k);
            // Every kernel this CPU runs (none without AVX2: nothing to check).
            for kernel in Kernel::available() {
                let got = product_with(kernel, &x, &w, rows, n, k);
                for (index, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-4 * (1.0 + e.abs()),
                        "{kernel:?}: {rows}x{k} · ({n}x{k})ᵀ, output {index}: {g} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_same_bits_on_one_thread_and_on_the_pool() {
        let (rows, n, k) = (16, 1000, 300);
        assert!(rows * n * k >= PARALLEL_FROM);
        let (x, w) = (values(rows * k, 3), values(n * k, 4));
        let one_thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        for kernel in Kernel::available() {
            let pooled = product_with(kernel, &x, &w, rows, n, k);
            let single = one_thread.install(|| product_with(kernel, &x, &w, rows, n, k));
            assert_eq!(pooled, single, "{kernel:?}");
        }
    }

    #[test]
    fn used_on_the_cpu_backend_without_autodiff_only() {
        let device = Default::default();
        let x = Tensor::<Cpu, 2>::from_data(TensorData::new(values(4 * 20, 5), [4, 20]), &device);
        let w = Tensor::<Cpu, 2>::from_data(TensorData::new(values(6 * 20, 6), [6, 20]), &device);
        let Some(fast) = matmul_transposed(&x, &w) else {
            return; // no AVX2 on this CPU
        };
        let plain = x.clone().matmul(w.clone().transpose());
        fast.into_data()
            .assert_approx_eq::<f32>(&plain.into_data(), burn::tensor::Tolerance::default());
        // A strided view, or under autodiff: the backend's own product.
        assert!(matmul_transposed(&x.clone().transpose(), &w.clone().transpose()).is_none());
        let x = Tensor::<CpuAutodiff, 2>::zeros([4, 20], &device);
        let w = Tensor::<CpuAutodiff, 2>::zeros([6, 20], &device);
        assert!(matmul_transposed(&x, &w).is_none());
    }
}
