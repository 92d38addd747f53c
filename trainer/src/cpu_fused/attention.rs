//! Attention's core as one op on the CPU backend: per head,
//! `softmax(mask_fill(q · kᵀ · scale, blocked, f32::MIN)) · v`, with its own backward pass
//! under autodiff, and the forward pass alone without (generation reads the key/value cache
//! in place, through its strides).
//!
//! Ours because the composed form moves every head around on one thread: the projections give
//! `[batch, seq, heads, head_dim]`, Burn's batched product wants `[batch, heads, seq,
//! head_dim]`, and the CPU backend copies each strided view into that layout (and the
//! gradients back) before and after every product. Here the products (the `gemm` crate that
//! burn-flex itself calls) read queries, keys, values and upstream gradients through their
//! strides and write outputs and gradients straight into `[batch, seq, heads, head_dim]`, the
//! layout the next projection reads. Each (sequence, key/value head) pair is one task of the
//! thread pool and each product runs on one thread, so results repeat bit for bit whatever
//! the number of threads. Under autodiff the probabilities are kept for the backward pass, as
//! the composed form keeps them.

use super::products::{product, Matrix, OutputBuffer, Strided};
use super::{
    checked, cpu_node, cpu_values, from_cpu_values, on_cpu_autodiff, on_cpu_inference, record,
    softmax_backward_row, softmax_row,
};
use crate::backend::{Cpu, CpuAutodiff};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::prelude::*;
use burn::tensor::{BoolStore, DType};
use burn_flex::FlexTensor;
use rayon::prelude::*;
use std::sync::Arc;

/// `softmax(mask_fill(q · kᵀ · scale, blocked, f32::MIN)) · v` for queries `q: [batch, heads,
/// queries, head_dim]` over keys and values `[batch, kv_heads, keys, head_dim]` (query head `h`
/// reads key/value head `h / (heads / kv_heads)`), `blocked` broadcastable to `[batch,
/// kv_heads, heads / kv_heads, queries, keys]`: fused on the CPU backend (with or without
/// autodiff); the inputs back elsewhere. The result is `[batch, heads, queries, head_dim]`, stored as
/// `[batch, queries, heads, head_dim]` (so merging the heads after `swap_dims(1, 2)` is free).
#[allow(clippy::type_complexity)]
pub fn attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    blocked: &Tensor<B, 5, Bool>,
    scale: f64,
) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>)> {
    let dims = Dims::of(&q.dims(), &k.dims(), &v.dims(), &blocked.dims());
    let byte_mask = matches!(
        blocked.dtype(),
        DType::Bool(BoolStore::Native | BoolStore::U8)
    );
    let dtypes = [q.dtype(), k.dtype(), v.dtype()];
    let (Some(dims), true) = (dims, byte_mask) else {
        return Err((q, k, v));
    };
    if on_cpu_inference::<B>(&dtypes) {
        let blocked: Tensor<Cpu, 5, Bool> = checked(blocked.clone());
        let state = AttentionState {
            dims,
            scale: scale as f32,
            q: cpu_values(q),
            k: cpu_values(k),
            v: cpu_values(v),
            blocked: blocked.into_primitive(),
            probs: Arc::default(),
        };
        return Ok(from_cpu_values(state.forward(false).0));
    }
    if !on_cpu_autodiff::<B>(&dtypes) {
        return Err((q, k, v));
    }
    let [q, k, v] = [q, k, v].map(cpu_node);
    let blocked: Tensor<CpuAutodiff, 5, Bool> = checked(blocked.clone());
    let state = AttentionState {
        dims,
        scale: scale as f32,
        q: q.primitive.clone(),
        k: k.primitive.clone(),
        v: v.primitive.clone(),
        blocked: blocked.into_primitive(),
        probs: Arc::default(),
    };
    let (out, probs) = state.forward(true);
    let state = AttentionState {
        probs: Arc::new(probs),
        ..state
    };
    Ok(checked(record::<_, 3, 4>(
        AttentionBackward,
        [&q, &k, &v],
        state,
        out,
    )))
}

/// The sizes of one attention call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    heads: usize,
    kv_heads: usize,
    queries: usize,
    keys: usize,
    head_dim: usize,
}

impl Dims {
    /// The sizes, where the shapes fit together (and none is empty).
    fn of(q: &[usize; 4], k: &[usize; 4], v: &[usize; 4], blocked: &[usize; 5]) -> Option<Self> {
        let [batch, heads, queries, head_dim] = *q;
        let [_, kv_heads, keys, _] = *k;
        let dims = Self {
            batch,
            heads,
            kv_heads,
            queries,
            keys,
            head_dim,
        };
        let fits = |size: usize, full: usize| size == full || size == 1;
        let groups = heads.checked_div(kv_heads)?;
        let ok = k == v
            && k[0] == batch
            && k[3] == head_dim
            && heads % kv_heads == 0
            && q.iter().chain(k).all(|&n| n > 0)
            && [batch, kv_heads, groups, queries, keys]
                .iter()
                .zip(blocked)
                .all(|(&full, &size)| fits(size, full));
        ok.then_some(dims)
    }

    fn groups(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// One task per (sequence, key/value head).
    fn tasks(&self) -> usize {
        self.batch * self.kv_heads
    }

    /// Scores of one head: `[queries, keys]`.
    fn head_scores(&self) -> usize {
        self.queries * self.keys
    }
}

/// What the forward pass computes from and the backward pass needs.
#[derive(Debug, Clone)]
struct AttentionState {
    dims: Dims,
    scale: f32,
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    blocked: FlexTensor,
    /// `[batch, heads, queries, keys]`, contiguous.
    probs: Arc<Vec<f32>>,
}

impl Strided<'_, u8> {
    /// The scores `row` of query `i` of group `g` of key/value head `kv` of sequence `b`:
    /// `fill` where the key is blocked, `x · scale` elsewhere. A contiguous mask row (the
    /// usual case) is read as a slice, in a loop without branches that the compiler
    /// vectorises.
    fn mask_row(&self, [b, kv, g, i]: [usize; 4], row: &mut [f32], scale: f32, fill: f32) {
        let (start, stride) = (self.position(&[b, kv, g, i]), self.last_stride());
        let pick = |x: &mut f32, blocked: u8| *x = if blocked != 0 { fill } else { *x * scale };
        if stride == 1 {
            let mask = &self.data[start as usize..start as usize + row.len()];
            row.iter_mut()
                .zip(mask)
                .for_each(|(x, &blocked)| pick(x, blocked));
        } else {
            for (j, x) in row.iter_mut().enumerate() {
                pick(x, self.data[(start + j as isize * stride) as usize]);
            }
        }
    }
}

/// `values: [batch, seq, heads, head_dim]` as the `[batch, heads, seq, head_dim]` tensor it
/// holds.
fn heads_view(values: Vec<f32>, [batch, seq, heads, head_dim]: [usize; 4]) -> FlexTensor {
    super::flex_f32(values, Shape::new([batch, seq, heads, head_dim])).transpose(1, 2)
}

impl AttentionState {
    fn blocked(&self) -> Strided<'_, u8> {
        Strided::with(self.blocked.storage::<u8>(), &self.blocked)
    }

    /// The output (`[batch, heads, queries, head_dim]`, stored by query) and, when
    /// `keep_probs` (for the backward pass), the probabilities; else they live in each task's
    /// scratch only (inference).
    fn forward(&self, keep_probs: bool) -> (FlexTensor, Vec<f32>) {
        let d = self.dims;
        let (q, k, v, blocked) = (
            Strided::of(&self.q),
            Strided::of(&self.k),
            Strided::of(&self.v),
            self.blocked(),
        );
        let out_dims = [d.batch, d.queries, d.heads, d.head_dim];
        let mut out = OutputBuffer::new(out_dims.iter().product());
        let kept = if keep_probs { d.heads } else { 0 };
        let mut probs = OutputBuffer::new(d.batch * kept * d.head_scores());
        let (out_buffer, probs_buffer) = (out.shared(), probs.shared());
        (0..d.tasks()).into_par_iter().for_each(|task| {
            let (b, kv) = (task / d.kv_heads, task % d.kv_heads);
            let (keys, values) = (k.matrix(&[b, kv]), v.matrix(&[b, kv]));
            let mut scratch = vec![0.0f32; if keep_probs { 0 } else { d.head_scores() }];
            for g in 0..d.groups() {
                let head = kv * d.groups() + g;
                let scores = match keep_probs {
                    true => {
                        let start = (b * d.heads + head) * d.head_scores();
                        Matrix::rows_of(probs_buffer.ptr(), start, d.keys)
                    }
                    false => Matrix::rows_of(scratch.as_mut_ptr(), 0, d.keys),
                };
                let (query, output) = (
                    q.matrix(&[b, head]),
                    Matrix::head_of(out_buffer.ptr(), out_dims, b, head),
                );
                let one_query = d.queries == 1 && one_query::applies(&[query, keys, values]);
                // Safety: the matrices lie in their tensors' storage; this task alone
                // writes this head's scores and output rows; `one_query` checked its CPU
                // and strides.
                unsafe {
                    match one_query {
                        true => one_query::scores(query, keys, scores, d.keys, d.head_dim),
                        false => product(
                            [d.queries, d.keys, d.head_dim],
                            scores,
                            query,
                            keys.transposed(),
                            false,
                            gemm::Parallelism::None,
                        ),
                    }
                    let rows = std::slice::from_raw_parts_mut(scores.start, d.head_scores());
                    for (i, row) in rows.chunks_mut(d.keys).enumerate() {
                        blocked.mask_row([b, kv, g, i], row, self.scale, f32::MIN);
                        softmax_row(row);
                    }
                    match one_query {
                        true => one_query::weighted_sum(scores, values, output, d.keys, d.head_dim),
                        false => product(
                            [d.queries, d.head_dim, d.keys],
                            output,
                            scores,
                            values,
                            false,
                            gemm::Parallelism::None,
                        ),
                    }
                }
            }
        });
        // Safety: the tasks wrote every head of every sequence, output and (when kept) scores.
        let (out, probs) = unsafe { (out.written(), probs.written()) };
        (heads_view(out, out_dims), probs)
    }

    /// The gradients of `q`, `k` and `v` from the output's, `grad`.
    fn backward(&self, grad: &FlexTensor) -> [FlexTensor; 3] {
        let d = self.dims;
        let (q, k, v, dout, blocked) = (
            Strided::of(&self.q),
            Strided::of(&self.k),
            Strided::of(&self.v),
            Strided::of(grad),
            self.blocked(),
        );
        let q_dims = [d.batch, d.queries, d.heads, d.head_dim];
        let kv_dims = [d.batch, d.keys, d.kv_heads, d.head_dim];
        let mut dq = OutputBuffer::new(q_dims.iter().product());
        let mut dk = OutputBuffer::new(kv_dims.iter().product());
        let mut dv = OutputBuffer::new(kv_dims.iter().product());
        let (dq_buffer, dk_buffer, dv_buffer) = (dq.shared(), dk.shared(), dv.shared());
        (0..d.tasks()).into_par_iter().for_each(|task| {
            let (b, kv) = (task / d.kv_heads, task % d.kv_heads);
            let (keys, values) = (k.matrix(&[b, kv]), v.matrix(&[b, kv]));
            let (dkeys, dvalues) = (
                Matrix::head_of(dk_buffer.ptr(), kv_dims, b, kv),
                Matrix::head_of(dv_buffer.ptr(), kv_dims, b, kv),
            );
            let mut dprobs = vec![0.0f32; d.head_scores()];
            let mut dscores = vec![0.0f32; d.head_scores()];
            for g in 0..d.groups() {
                let head = kv * d.groups() + g;
                let start = (b * d.heads + head) * d.head_scores();
                let probs = &self.probs[start..start + d.head_scores()];
                // Only read through this pointer.
                let probs_matrix = Matrix::rows_of(probs.as_ptr().cast_mut(), 0, d.keys);
                let dscores_matrix = Matrix::rows_of(dscores.as_mut_ptr(), 0, d.keys);
                let upstream = dout.matrix(&[b, head]);
                let accumulate = g > 0;
                // Safety: as in `forward`; the probabilities are only read.
                unsafe {
                    // dP = dO · vᵀ
                    product(
                        [d.queries, d.keys, d.head_dim],
                        Matrix::rows_of(dprobs.as_mut_ptr(), 0, d.keys),
                        upstream,
                        values.transposed(),
                        false,
                        gemm::Parallelism::None,
                    );
                    // dS = softmax backward of dP, zero where blocked, times the scale.
                    for (i, ((ds, p), dp)) in dscores
                        .chunks_mut(d.keys)
                        .zip(probs.chunks(d.keys))
                        .zip(dprobs.chunks(d.keys))
                        .enumerate()
                    {
                        softmax_backward_row(ds, p, dp);
                        blocked.mask_row([b, kv, g, i], ds, self.scale, 0.0);
                    }
                    // dq = dS · k;  dk += dSᵀ · q;  dv += Pᵀ · dO
                    product(
                        [d.queries, d.head_dim, d.keys],
                        Matrix::head_of(dq_buffer.ptr(), q_dims, b, head),
                        dscores_matrix,
                        keys,
                        false,
                        gemm::Parallelism::None,
                    );
                    product(
                        [d.keys, d.head_dim, d.queries],
                        dkeys,
                        dscores_matrix.transposed(),
                        q.matrix(&[b, head]),
                        accumulate,
                        gemm::Parallelism::None,
                    );
                    product(
                        [d.keys, d.head_dim, d.queries],
                        dvalues,
                        probs_matrix.transposed(),
                        upstream,
                        accumulate,
                        gemm::Parallelism::None,
                    );
                }
            }
        });
        // Safety: each head's first group wrote its key and value gradients, and every
        // head its query gradients.
        let (dq, dk, dv) = unsafe { (dq.written(), dk.written(), dv.written()) };
        [
            heads_view(dq, q_dims),
            heads_view(dk, kv_dims),
            heads_view(dv, kv_dims),
        ]
    }
}

/// A decoding step's attention of one head (a single query): the scores `q · k_j` and the
/// output `Σ_j p_j v_j` in AVX-512 registers, where a call of the `gemm` crate per head costs
/// more than its arithmetic (two calls per head, per sequence, per layer, every step).
mod one_query {
    use super::Matrix;

    /// Whether this CPU has AVX-512 and the rows (query, keys, values) are contiguous.
    pub(super) fn applies(rows: &[Matrix<f32>]) -> bool {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            return rows.iter().all(|m| m.column_stride == 1);
        }
        let _ = rows;
        false
    }

    /// `scores[j] = query · keys[j]` for `keys` rows of `head_dim`.
    ///
    /// # Safety
    /// [`applies`] holds; the matrices hold `keys` rows of `head_dim` values.
    pub(super) unsafe fn scores(
        query: Matrix<f32>,
        keys: Matrix<f32>,
        scores: Matrix<f32>,
        count: usize,
        head_dim: usize,
    ) {
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx512::scores(query.start, keys, scores.start, count, head_dim)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (query, keys, scores, count, head_dim);
            unreachable!("`applies` is false off x86-64")
        }
    }

    /// `output = Σ_j probs[j] · values[j]`.
    ///
    /// # Safety
    /// As [`scores`]; `output` holds `head_dim` values.
    pub(super) unsafe fn weighted_sum(
        probs: Matrix<f32>,
        values: Matrix<f32>,
        output: Matrix<f32>,
        count: usize,
        head_dim: usize,
    ) {
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx512::weighted_sum(probs.start, values, output.start, count, head_dim)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (probs, values, output, count, head_dim);
            unreachable!("`applies` is false off x86-64")
        }
    }

    #[cfg(target_arch = "x86_64")]
    mod avx512 {
        use super::Matrix;
        use std::arch::x86_64::*;

        /// The lanes of `head_dim` from `t` on (sixteen, or fewer at the end).
        fn lanes(t: usize, head_dim: usize) -> __mmask16 {
            match head_dim - t {
                16.. => 0xFFFF,
                rest => (1u16 << rest) - 1,
            }
        }

        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn scores(
            query: *const f32,
            keys: Matrix<f32>,
            scores: *mut f32,
            count: usize,
            head_dim: usize,
        ) {
            for j in 0..count {
                // Safety: row j of keys, and the query, hold head_dim values.
                unsafe {
                    let key = keys.start.offset(j as isize * keys.row_stride);
                    let mut sum = _mm512_setzero_ps();
                    for t in (0..head_dim).step_by(16) {
                        let mask = lanes(t, head_dim);
                        let (q, k) = (
                            _mm512_maskz_loadu_ps(mask, query.add(t)),
                            _mm512_maskz_loadu_ps(mask, key.add(t)),
                        );
                        sum = _mm512_fmadd_ps(q, k, sum);
                    }
                    *scores.add(j) = _mm512_reduce_add_ps(sum);
                }
            }
        }

        #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn weighted_sum(
            probs: *const f32,
            values: Matrix<f32>,
            output: *mut f32,
            count: usize,
            head_dim: usize,
        ) {
            // Up to four accumulators of sixteen lanes side by side (64 values of head_dim),
            // so that consecutive multiply-adds do not wait on each other.
            for first in (0..head_dim).step_by(64) {
                let mut sums = [_mm512_setzero_ps(); 4];
                let chunks = (head_dim - first).div_ceil(16).min(4);
                for j in 0..count {
                    // Safety: row j of values holds head_dim values; probs holds count.
                    unsafe {
                        let p = _mm512_set1_ps(*probs.add(j));
                        let row = values.start.offset(j as isize * values.row_stride);
                        for (c, sum) in sums.iter_mut().enumerate().take(chunks) {
                            let t = first + 16 * c;
                            let v = _mm512_maskz_loadu_ps(lanes(t, head_dim), row.add(t));
                            *sum = _mm512_fmadd_ps(p, v, *sum);
                        }
                    }
                }
                for (c, sum) in sums.iter().enumerate().take(chunks) {
                    let t = first + 16 * c;
                    // Safety: output holds head_dim values.
                    unsafe { _mm512_mask_storeu_ps(output.add(t), lanes(t, head_dim), *sum) };
                }
            }
        }
    }
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<Cpu, 3> for AttentionBackward {
    type State = AttentionState;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<Cpu>(&ops.node);
        let gradients = ops.state.backward(&grad);
        for (parent, gradient) in ops.parents.into_iter().zip(gradients) {
            if let Some(parent) = parent {
                grads.register::<Cpu>(parent.id, gradient);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{assert_close, spread_values};
    use super::*;
    use burn::tensor::activation::softmax;

    type AB = CpuAutodiff;
    const BATCH: usize = 2;
    const HEADS: usize = 6;
    const KV_HEADS: usize = 2;
    const QUERIES: usize = 7;
    const KEYS: usize = 11;
    const HEAD_DIM: usize = 8;

    /// `[batch, seq, heads, head_dim]` values seen as `[batch, heads, seq, head_dim]`, as the
    /// model's projections hand them over (strided).
    fn heads(seq: usize, heads: usize, seed: usize) -> Tensor<Cpu, 4> {
        let shape = [BATCH, seq, heads, HEAD_DIM];
        let values = spread_values(shape.iter().product(), seed);
        Tensor::<Cpu, 4>::from_data(TensorData::new(values, shape), &Default::default())
            .swap_dims(1, 2)
    }

    /// Queries may see keys up to 4 past their own position, sequence 1 not its first two
    /// keys, and sequence 0's last query nothing at all (a padding row).
    fn blocked() -> Tensor<AB, 5, Bool> {
        let mut values = vec![false; BATCH * QUERIES * KEYS];
        for b in 0..BATCH {
            for i in 0..QUERIES {
                for j in 0..KEYS {
                    let padding_row = b == 0 && i == QUERIES - 1;
                    values[(b * QUERIES + i) * KEYS + j] =
                        j > i + 4 || (b == 1 && j < 2) || padding_row;
                }
            }
        }
        let data = TensorData::new(values, [BATCH, 1, 1, QUERIES, KEYS]);
        Tensor::from_data(data, &Default::default())
    }

    /// The composed form: heads repeated per group, product, scale, mask, softmax, product.
    fn composed(q: Tensor<AB, 4>, k: Tensor<AB, 4>, v: Tensor<AB, 4>) -> Tensor<AB, 4> {
        let groups = HEADS / KV_HEADS;
        let repeat = |x: Tensor<AB, 4>| {
            x.unsqueeze_dim::<5>(2)
                .expand([BATCH, KV_HEADS, groups, KEYS, HEAD_DIM])
                .reshape([BATCH, HEADS, KEYS, HEAD_DIM])
        };
        let blocked = blocked()
            .expand([BATCH, KV_HEADS, groups, QUERIES, KEYS])
            .reshape([BATCH, HEADS, QUERIES, KEYS]);
        let scores = q.matmul(repeat(k).swap_dims(2, 3)) * (HEAD_DIM as f64).powf(-0.5);
        softmax(scores.mask_fill(blocked, f32::MIN), 3).matmul(repeat(v))
    }

    /// Queries, keys, values and the gradient of the output.
    fn inputs() -> [Tensor<Cpu, 4>; 4] {
        [
            heads(QUERIES, HEADS, 1),
            heads(KEYS, KV_HEADS, 2),
            heads(KEYS, KV_HEADS, 3),
            heads(QUERIES, HEADS, 4),
        ]
    }

    /// The output and the gradients of q, k and v against the given upstream gradient.
    fn run(fused: bool, [q, k, v, upstream]: [Tensor<Cpu, 4>; 4]) -> [Tensor<Cpu, 4>; 4] {
        let [q, k, v] = [q, k, v].map(|x| Tensor::<AB, 4>::from_inner(x).require_grad());
        let scale = (HEAD_DIM as f64).powf(-0.5);
        let out = match fused {
            true => attention(q.clone(), k.clone(), v.clone(), &blocked(), scale)
                .unwrap_or_else(|_| panic!("the CPU autodiff path")),
            false => composed(q.clone(), k.clone(), v.clone()),
        };
        let grads = (out.clone() * Tensor::from_inner(upstream))
            .sum()
            .backward();
        let grad = |x: &Tensor<AB, 4>| x.grad(&grads).expect("takes a gradient");
        [out.inner(), grad(&q), grad(&k), grad(&v)]
    }

    #[test]
    fn fused_attention_matches_the_composed_form_forward_and_backward() {
        let (fused, composed) = (run(true, inputs()), run(false, inputs()));
        for (name, (a, b)) in ["output", "dq", "dk", "dv"]
            .iter()
            .zip(fused.into_iter().zip(composed))
        {
            assert_close(name, a, b, 1e-5);
        }
    }

    #[test]
    fn fused_attention_gives_the_same_bits_on_any_number_of_threads() {
        let inputs = inputs();
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| run(true, inputs.clone()))
                .map(|t| t.into_data())
        };
        assert_eq!(on(1), on(3));
    }

    #[test]
    fn without_autodiff_fused_attention_gives_the_same_bits() {
        let [q, k, v, upstream] = inputs();
        let scale = (HEAD_DIM as f64).powf(-0.5);
        let blocked: Tensor<Cpu, 5, Bool> = blocked().inner();
        let plain = attention(q.clone(), k.clone(), v.clone(), &blocked, scale)
            .unwrap_or_else(|_| panic!("the CPU path"));
        let [tracked, ..] = run(true, [q, k, v, upstream]);
        assert_eq!(plain.into_data(), tracked.into_data());
    }

    #[test]
    fn one_query_per_head_as_decoding_matches_the_composed_form() {
        // head_dim 80: five sixteen-lane chunks, the last past the first four accumulators;
        // 21 keys of which some are blocked.
        let (heads, kv_heads, keys, head_dim) = (6, 2, 21, 80);
        let device = Default::default();
        let tensor = |shape: [usize; 4], seed| {
            let values = spread_values(shape.iter().product(), seed);
            Tensor::<Cpu, 4>::from_data(TensorData::new(values, shape), &device)
        };
        let q = tensor([BATCH, 1, heads, head_dim], 31).swap_dims(1, 2);
        let k = tensor([BATCH, kv_heads, keys, head_dim], 32);
        let v = tensor([BATCH, kv_heads, keys, head_dim], 33);
        let blocked: Vec<bool> = (0..BATCH * keys).map(|i| i % 5 == 3).collect();
        let blocked = Tensor::<Cpu, 5, Bool>::from_data(
            TensorData::new(blocked, [BATCH, 1, 1, 1, keys]),
            &device,
        );
        let scale = (head_dim as f64).powf(-0.5);
        let fused = attention(q.clone(), k.clone(), v.clone(), &blocked, scale)
            .unwrap_or_else(|_| panic!("the CPU path"));
        let groups = heads / kv_heads;
        let repeat = |x: Tensor<Cpu, 4>| {
            x.unsqueeze_dim::<5>(2)
                .expand([BATCH, kv_heads, groups, keys, head_dim])
                .reshape([BATCH, heads, keys, head_dim])
        };
        let mask = blocked
            .reshape([BATCH, 1, 1, keys])
            .expand([BATCH, heads, 1, keys]);
        let scores = q.matmul(repeat(k).swap_dims(2, 3)) * scale;
        let composed = softmax(scores.mask_fill(mask, f32::MIN), 3).matmul(repeat(v));
        assert_close("one query", fused, composed, 1e-5);
    }

    #[test]
    fn shapes_that_do_not_fit_take_the_composed_path() {
        let q = Tensor::<AB, 4>::from_inner(heads(QUERIES, HEADS, 1));
        let k = Tensor::<AB, 4>::from_inner(heads(KEYS, KV_HEADS, 2));
        let short_v = Tensor::<AB, 4>::from_inner(heads(KEYS - 1, KV_HEADS, 3));
        assert!(attention(q.clone(), k.clone(), short_v, &blocked(), 1.0).is_err());
        let four_kv_heads = Tensor::<AB, 4>::from_inner(heads(KEYS, 4, 2));
        assert!(attention(q, four_kv_heads.clone(), four_kv_heads, &blocked(), 1.0).is_err());
    }
}
