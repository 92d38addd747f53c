//! Fused operations for training on the CPU backend, each with its own backward pass:
//! attention's core (`attention`: products, scale, mask and softmax over heads read in place),
//! the linear layers' product (`linear`), attention's scale, mask and softmax alone (where a
//! bias or the probabilities are wanted) and the plain softmax over the last axis, the
//! next-token cross-entropy, the RMS norm, SwiGLU's `silu(gate) * up` and the rotary position
//! embedding. Attention's core, the RMS norm, the gate and the rotation also run without
//! autodiff (generation and evaluation), the same f32 operations as under it; and
//! `write_positions` writes a decoding step's keys into the key/value cache in place.
//! (AdamW's one-pass update is in `optim`.)
//!
//! Ours because Burn 0.21's autodiff builds each from a chain of element-wise ops (max,
//! subtract, exp, sum, divide or log, gather; then as many backward steps), each
//! a full pass over a large tensor on one thread. Here each is one pass forward and one
//! backward, over rows split across the thread pool in blocks of a fixed size, so results
//! repeat bit for bit whatever the number of threads. Used only for f32 tensors of the CPU
//! backend (found by type, as `model::cpu_matmul` does); other backends keep the composed
//! ops, which the tests compare against (values and gradients).

use crate::backend::{Cpu, CpuAutodiff};
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{binary, unary, Backward, Ops, OpsKind};
use burn::prelude::*;
use burn::tensor::{BoolStore, DType, TensorPrimitive};
use burn_flex::FlexTensor;
use rayon::prelude::*;
use std::any::{Any, TypeId};
use std::sync::Arc;

mod attention;
mod linear;
mod products;
pub use attention::attention;
pub use linear::matmul_transposed;

/// Elements a task of the thread pool covers: enough work to outweigh waking a thread. Fixed,
/// so that how work is split (and summed) does not depend on the number of threads.
pub(crate) const ELEMENTS_PER_TASK: usize = 1 << 14;

/// Whole rows of `columns` elements a task covers.
fn rows_per_task(columns: usize) -> usize {
    (ELEMENTS_PER_TASK / columns.max(1)).max(1)
}

/// `value` as a `U` when `T` and `U` are the same type.
pub(crate) fn same_type<T: 'static, U: 'static>(value: T) -> Result<U, T> {
    if TypeId::of::<T>() != TypeId::of::<U>() {
        return Err(value);
    }
    let boxed: Box<dyn Any> = Box::new(value);
    Ok(*boxed.downcast::<U>().expect("checked: the same type"))
}

/// `value` as a `U`, where the caller has checked that `T` is `U`.
pub(crate) fn checked<T: 'static, U: 'static>(value: T) -> U {
    same_type(value).unwrap_or_else(|_| unreachable!("the caller checked the type"))
}

/// `output` as the result of `op` in the autodiff graph, with `parents`; `state` is kept for
/// the backward pass only where some parent takes a gradient.
fn record<Op: Backward<Cpu, N>, const N: usize, const D: usize>(
    op: Op,
    parents: [&CpuNode; N],
    state: Op::State,
    output: FlexTensor,
) -> Tensor<CpuAutodiff, D> {
    let nodes = parents.map(|parent| parent.node.clone());
    let output = match op
        .prepare::<NoCheckpointing>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    };
    Tensor::from_primitive(TensorPrimitive::Float(output))
}

/// The f32 values of a CPU tensor in row-major order (a copy only when it is strided).
pub(crate) fn contiguous_f32(tensor: &FlexTensor) -> FlexTensor {
    if tensor.as_slice::<f32>().is_some() {
        tensor.clone()
    } else {
        tensor.to_contiguous()
    }
}

pub(crate) fn flex_f32(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// A CPU tensor with its place in the autodiff graph.
type CpuNode = burn::tensor::ops::FloatTensor<CpuAutodiff>;

/// Whether the fused ops apply: tensors of the CPU backend under autodiff, holding f32.
fn on_cpu_autodiff<B: Backend>(dtypes: &[DType]) -> bool {
    TypeId::of::<B>() == TypeId::of::<CpuAutodiff>() && dtypes.iter().all(|d| *d == DType::F32)
}

/// Whether the fused ops' forward pass alone applies: tensors of the CPU backend without
/// autodiff (inference: generation, evaluation), holding f32.
fn on_cpu_inference<B: Backend>(dtypes: &[DType]) -> bool {
    TypeId::of::<B>() == TypeId::of::<Cpu>() && dtypes.iter().all(|d| *d == DType::F32)
}

/// The CPU tensor that `tensor` is, where [`on_cpu_inference`] holds.
fn cpu_values<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> FlexTensor {
    checked::<_, Tensor<Cpu, D>>(tensor)
        .into_primitive()
        .tensor()
}

/// `values` as a tensor of `B`, where [`on_cpu_inference`] holds.
fn from_cpu_values<B: Backend, const D: usize>(values: FlexTensor) -> Tensor<B, D> {
    checked(Tensor::<Cpu, D>::from_primitive(TensorPrimitive::Float(
        values,
    )))
}

/// The CPU autodiff tensor (value and graph node) that `tensor` is, where
/// [`on_cpu_autodiff`] holds.
fn cpu_node<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> CpuNode {
    checked::<_, Tensor<CpuAutodiff, D>>(tensor)
        .into_primitive()
        .tensor()
}

/// `store[:, :, at..at + n] = new` for `store: [batch, heads, capacity, head_dim]` and `new:
/// [batch, heads, n, head_dim]` (any strides), written in place on the CPU backend without
/// autodiff where no one else holds `store`; the inputs back elsewhere. (burn-flex's
/// `slice_assign` copies the whole tensor first: it keeps the tensor it was given alive
/// while writing a clone of it, which made each decoding step copy the whole key/value cache.)
#[allow(clippy::type_complexity)]
pub fn write_positions<B: Backend>(
    store: Tensor<B, 4>,
    at: usize,
    new: Tensor<B, 4>,
) -> Result<Tensor<B, 4>, (Tensor<B, 4>, Tensor<B, 4>)> {
    let ([batch, heads, capacity, head_dim], [nb, nh, n, nd]) = (store.dims(), new.dims());
    let fits = [nb, nh, nd] == [batch, heads, head_dim] && at + n <= capacity;
    if !fits || !on_cpu_inference::<B>(&[store.dtype(), new.dtype()]) {
        return Err((store, new));
    }
    let (mut store, new) = (cpu_values(store), cpu_values(new));
    let whole = store.layout().is_contiguous() && store.layout().start_offset() == 0;
    let source = products::Strided::of(&new);
    let Some(target) = whole.then(|| store.try_storage_mut::<f32>()).flatten() else {
        return Err((from_cpu_values(store), from_cpu_values(new)));
    };
    let step = source.last_stride();
    for (b, h, t) in
        (0..batch).flat_map(|b| (0..heads).flat_map(move |h| (0..n).map(move |t| (b, h, t))))
    {
        let from = source.position(&[b, h, t]);
        let to = ((b * heads + h) * capacity + at + t) * head_dim;
        for (d, value) in target[to..to + head_dim].iter_mut().enumerate() {
            *value = source.data[(from + d as isize * step) as usize];
        }
    }
    Ok(from_cpu_values(store))
}

/// Values spread over [-2, 2) by a fixed formula, for tests (the backend's seeded generator
/// is shared by tests running at once).
#[cfg(test)]
fn spread_values(len: usize, seed: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919 + seed * 104_729) % 1009) as f32 / 252.25 - 2.0)
        .collect()
}

/// For tests: `a` within `relative` times `b`'s largest magnitude, which must be
/// sizeable for the comparison to mean something.
#[cfg(test)]
fn assert_close<const D: usize>(name: &str, a: Tensor<Cpu, D>, b: Tensor<Cpu, D>, relative: f32) {
    assert_eq!(a.dims(), b.dims(), "{name}");
    let size: f32 = b.clone().abs().max().into_scalar();
    let difference: f32 = (a - b).abs().max().into_scalar();
    assert!(size > 0.1, "{name}: a test that means something");
    assert!(
        difference <= relative * size,
        "{name} differs by {difference} (largest value {size})"
    );
}

// ---- softmax over the last axis -------------------------------------------------------------

/// `softmax(x)` over the last axis; fused on the CPU backend under autodiff.
pub fn softmax_last<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    if !on_cpu_autodiff::<B>(&[x.dtype()]) {
        return burn::tensor::activation::softmax(x, D - 1);
    }
    let shape = x.shape();
    let node = cpu_node(x);
    let input = contiguous_f32(&node.primitive);
    let columns = shape.dims::<D>()[D - 1];
    let probs = flex_f32(
        softmax_rows(input.as_slice().expect("contiguous"), columns),
        shape,
    );
    checked(record::<_, 1, D>(
        SoftmaxBackward,
        [&node],
        probs.clone(),
        probs,
    ))
}

/// Row-wise `exp(x - max) / Σ exp(x - max)`, summed left to right.
pub fn softmax_rows(x: &[f32], columns: usize) -> Vec<f32> {
    let mut y = x.to_vec();
    softmax_rows_in_place(&mut y, columns);
    y
}

/// [`softmax_rows`] over `x`'s own buffer.
fn softmax_rows_in_place(x: &mut [f32], columns: usize) {
    let rows = rows_per_task(columns) * columns;
    x.par_chunks_mut(rows)
        .for_each(|x| x.chunks_mut(columns).for_each(softmax_row));
}

/// One row's `exp(x - max) / Σ exp(x - max)`, in place, summed left to right.
fn softmax_row(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // The exponentials first (a loop the compiler vectorises), then the ordered sum.
    x.iter_mut().for_each(|x| *x = exp(*x - max));
    let sum: f32 = x.iter().sum();
    x.iter_mut().for_each(|x| *x /= sum);
}

/// `e^x` within a few ulp of `f32::exp`, written so that loops over it vectorise (libm's
/// `expf` is a call per element; it was 8% of a training step's time). Cephes' `expf`:
/// `x = n ln 2 + r` with `|r| ≤ ln 2 / 2`, `e^r` by a polynomial, `2^n` put in the exponent.
/// Below -87.3 (where `f32` results turn subnormal) it gives 0, above 88.7 infinity, and
/// NaN for NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2_E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two, the first part exact in few bits, so that `x - n ln 2` loses nothing.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to the nearest integer and leaves it in the low mantissa bits.
    // (Plain products and sums, not `mul_add`: without FMA in the target that is a call.)
    const ROUND: f32 = 12_582_912.0;
    let clamped = x.clamp(-87.3, 88.7);
    let shifted = clamped * LOG2_E + ROUND;
    let rounded = shifted - ROUND;
    let r = clamped - rounded * LN2_HI - rounded * LN2_LO;
    let mut p = 1.987_569_2e-4f32;
    for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = p * r + c;
    }
    let e_r = p * r * r + r + 1.0;
    // 2^n as two factors, 2^(n/2) and 2^(n - n/2): each a normal f32 for n = -126..=128.
    let n = shifted.to_bits() as i32 - 0x4B40_0000;
    let power_of_two = |k: i32| f32::from_bits(((k + 127) << 23) as u32);
    let (half, rest) = (n >> 1, n - (n >> 1));
    match x {
        x if x < -87.3 => 0.0,
        x if x > 88.7 => f32::INFINITY,
        _ => e_r * power_of_two(half) * power_of_two(rest), // also NaN for NaN
    }
}

/// `dx = y ⊙ (dy − Σ dy ⊙ y)` per row, from the probabilities `y` the forward pass kept.
#[derive(Debug)]
struct SoftmaxBackward;

impl Backward<Cpu, 1> for SoftmaxBackward {
    type State = FlexTensor;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let probs = ops.state;
        unary::<Cpu, _>(ops.parents, ops.node, grads, |grad| {
            let shape = probs.layout().shape().clone();
            let columns = shape[shape.num_dims() - 1];
            let grad = contiguous_f32(&grad);
            let dx = softmax_backward_rows(
                probs.as_slice().expect("kept contiguous"),
                grad.as_slice().expect("contiguous"),
                columns,
            );
            flex_f32(dx, shape)
        });
    }
}

fn softmax_backward_rows(y: &[f32], dy: &[f32], columns: usize) -> Vec<f32> {
    let mut dx = vec![0.0f32; y.len()];
    let rows = rows_per_task(columns) * columns;
    dx.par_chunks_mut(rows)
        .zip(y.par_chunks(rows).zip(dy.par_chunks(rows)))
        .for_each(|(dx, (y, dy))| {
            for (dx, (y, dy)) in dx
                .chunks_mut(columns)
                .zip(y.chunks(columns).zip(dy.chunks(columns)))
            {
                softmax_backward_row(dx, y, dy);
            }
        });
    dx
}

/// One row's `dx = y ⊙ (dy − Σ dy ⊙ y)`.
fn softmax_backward_row(dx: &mut [f32], y: &[f32], dy: &[f32]) {
    let dot: f32 = y.iter().zip(dy).map(|(y, dy)| y * dy).sum();
    for (dx, (y, dy)) in dx.iter_mut().zip(y.iter().zip(dy)) {
        *dx = y * (dy - dot);
    }
}

/// `softmax(mask_fill(x · scale, blocked, f32::MIN))` over the last axis (attention's scores),
/// fused on the CPU backend under autodiff for a mask of `x`'s shape; `x` back elsewhere.
/// The same f32 operations as the composed form with [`softmax_last`].
pub fn masked_softmax<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    blocked: &Tensor<B, D, Bool>,
    scale: f64,
) -> Result<Tensor<B, D>, Tensor<B, D>> {
    // One byte per mask element (`mask_bytes`), which is how the CPU backend stores bools.
    let byte_mask = matches!(
        blocked.dtype(),
        DType::Bool(BoolStore::Native | BoolStore::U8)
    );
    if blocked.shape() != x.shape() || !byte_mask || !on_cpu_autodiff::<B>(&[x.dtype()]) {
        return Err(x);
    }
    let shape = x.shape();
    let node = cpu_node(x);
    let blocked: Tensor<CpuAutodiff, D, Bool> = checked(blocked.clone());
    let blocked = blocked.into_primitive().to_contiguous();
    let columns = shape.dims::<D>()[D - 1];
    let (scale, input) = (scale as f32, contiguous_f32(&node.primitive));
    // The scaled, masked scores, turned into probabilities in the same buffer.
    let mut probs: Vec<f32> = input
        .as_slice::<f32>()
        .expect("contiguous")
        .iter()
        .zip(mask_bytes(&blocked))
        .map(|(&x, &m)| if m != 0 { f32::MIN } else { x * scale })
        .collect();
    softmax_rows_in_place(&mut probs, columns);
    let probs = flex_f32(probs, shape);
    let state = (probs.clone(), blocked, scale);
    Ok(checked(record::<_, 1, D>(
        MaskedSoftmaxBackward,
        [&node],
        state,
        probs,
    )))
}

/// One byte per element of a contiguous bool tensor, nonzero where true.
fn mask_bytes(mask: &FlexTensor) -> &[u8] {
    let (start, end) = mask.layout().contiguous_offsets().expect("made contiguous");
    &mask.bytes()[start..end]
}

/// The softmax's backward, then zero where masked, times the scale.
#[derive(Debug)]
struct MaskedSoftmaxBackward;

impl Backward<Cpu, 1> for MaskedSoftmaxBackward {
    type State = (FlexTensor, FlexTensor, f32);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (probs, blocked, scale) = ops.state;
        unary::<Cpu, _>(ops.parents, ops.node, grads, |grad| {
            let shape = probs.layout().shape().clone();
            let columns = shape[shape.num_dims() - 1];
            let grad = contiguous_f32(&grad);
            let mut dx = softmax_backward_rows(
                probs.as_slice().expect("kept contiguous"),
                grad.as_slice().expect("contiguous"),
                columns,
            );
            dx.par_chunks_mut(ELEMENTS_PER_TASK)
                .zip(mask_bytes(&blocked).par_chunks(ELEMENTS_PER_TASK))
                .for_each(|(dx, m)| {
                    for (dx, &m) in dx.iter_mut().zip(m) {
                        *dx = if m != 0 { 0.0 } else { *dx * scale };
                    }
                });
            flex_f32(dx, shape)
        });
    }
}

// ---- next-token cross-entropy ---------------------------------------------------------------

/// `Σ_rows weight · (logsumexp(logits) − logits[target])` for `logits: [batch, seq, vocab]`,
/// `targets` and `weights: [batch, seq]`; fused on the CPU backend under autodiff (rows of
/// weight 0 cost nothing); the logits back where it does not apply (another backend, or
/// weights that take a gradient themselves).
pub fn token_nll_sum<B: Backend>(
    logits: Tensor<B, 3>,
    targets: &Tensor<B, 2, Int>,
    weights: &Tensor<B, 2>,
) -> Result<Tensor<B, 1>, Tensor<B, 3>> {
    if weights.is_require_grad() || !on_cpu_autodiff::<B>(&[logits.dtype()]) {
        return Err(logits);
    }
    let [batch, seq, vocab] = logits.dims();
    let node = cpu_node(logits);
    let targets: Vec<i64> = targets.to_data().iter::<i64>().collect();
    let weights: Vec<f32> = weights.to_data().iter::<f32>().collect();
    assert_eq!(targets.len(), batch * seq, "targets: one per position");
    assert_eq!(weights.len(), batch * seq, "weights: one per position");
    let logits = contiguous_f32(&node.primitive);
    let rows = Arc::new(NllRows {
        targets,
        weights,
        vocab,
    });
    let (total, log_sum_exp) = rows.forward(logits.as_slice().expect("contiguous"));
    let total = flex_f32(vec![total], Shape::new([1]));
    let state = (logits, rows, Arc::new(log_sum_exp));
    Ok(checked(record::<_, 1, 1>(
        NllBackward,
        [&node],
        state,
        total,
    )))
}

/// Which logit each row picks and how much the row counts.
#[derive(Debug)]
struct NllRows {
    targets: Vec<i64>,
    weights: Vec<f32>,
    vocab: usize,
}

impl NllRows {
    fn target(&self, row: usize) -> usize {
        let target = self.targets[row];
        assert!(
            (0..self.vocab as i64).contains(&target),
            "target token {target} at position {row} is outside the vocabulary of {}",
            self.vocab
        );
        target as usize
    }

    /// The weighted sum and each row's log-sum-exp (0 where the weight is 0).
    fn forward(&self, logits: &[f32]) -> (f32, Vec<f32>) {
        let vocab = self.vocab;
        let log_sum_exp: Vec<f32> = logits
            .par_chunks(vocab)
            .enumerate()
            .map(|(row, x)| {
                if self.weights[row] == 0.0 {
                    return 0.0;
                }
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                // The exponentials a block at a time (vectorised), summed left to right.
                let mut sum = 0.0f32;
                let mut block = [0.0f32; 64];
                for x in x.chunks(block.len()) {
                    let block = &mut block[..x.len()];
                    block
                        .iter_mut()
                        .zip(x)
                        .for_each(|(e, &x)| *e = exp(x - max));
                    sum = block.iter().fold(sum, |sum, &e| sum + e);
                }
                max + sum.ln()
            })
            .collect();
        let total: f64 = (0..self.weights.len())
            .filter(|&row| self.weights[row] != 0.0)
            .map(|row| {
                let picked = logits[row * vocab + self.target(row)];
                self.weights[row] as f64 * (log_sum_exp[row] - picked) as f64
            })
            .sum();
        (total as f32, log_sum_exp)
    }

    /// `d/dlogits = upstream · weight · (softmax(logits) − onehot(target))`.
    fn backward(&self, logits: &[f32], log_sum_exp: &[f32], upstream: f32) -> Vec<f32> {
        let vocab = self.vocab;
        let mut grad = vec![0.0f32; logits.len()];
        grad.par_chunks_mut(vocab)
            .zip(logits.par_chunks(vocab))
            .enumerate()
            .for_each(|(row, (grad, x))| {
                let scale = upstream * self.weights[row];
                if scale == 0.0 {
                    return;
                }
                for (grad, &x) in grad.iter_mut().zip(x) {
                    *grad = scale * exp(x - log_sum_exp[row]);
                }
                grad[self.target(row)] -= scale;
            });
        grad
    }
}

#[derive(Debug)]
struct NllBackward;

impl Backward<Cpu, 1> for NllBackward {
    type State = (FlexTensor, Arc<NllRows>, Arc<Vec<f32>>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (logits, rows, log_sum_exp) = ops.state;
        unary::<Cpu, _>(ops.parents, ops.node, grads, |grad| {
            let grad = contiguous_f32(&grad);
            let upstream = grad.as_slice::<f32>().expect("contiguous")[0];
            let values = logits.as_slice().expect("kept contiguous");
            let shape = logits.layout().shape().clone();
            flex_f32(rows.backward(values, &log_sum_exp, upstream), shape)
        });
    }
}

// ---- RMS norm ---------------------------------------------------------------------------------

/// `weight * x / sqrt(mean(x^2) + eps)` over the last axis, fused on the CPU backend (with
/// or without autodiff); `x` and `weight` back elsewhere.
#[allow(clippy::type_complexity)]
pub fn rms_norm<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, 1>)> {
    let shape = x.shape();
    let hidden = shape.dims::<D>()[D - 1];
    if on_cpu_inference::<B>(&[x.dtype(), weight.dtype()]) {
        let (x, weight) = (cpu_values(x), cpu_values(weight));
        let (x, weight) = (contiguous_f32(&x), contiguous_f32(&weight));
        let [x, weight] = [&x, &weight].map(|t| t.as_slice::<f32>().expect("contiguous"));
        let y = RmsRows::new(x, hidden, eps as f32).forward(x, weight);
        return Ok(from_cpu_values(flex_f32(y, shape)));
    }
    if !on_cpu_autodiff::<B>(&[x.dtype(), weight.dtype()]) {
        return Err((x, weight));
    }
    let (x_node, w_node) = (cpu_node(x), cpu_node(weight));
    let x_values = contiguous_f32(&x_node.primitive);
    let w_values = contiguous_f32(&w_node.primitive);
    let norm = Arc::new(RmsRows::new(
        x_values.as_slice().expect("contiguous"),
        hidden,
        eps as f32,
    ));
    let y = norm.forward(
        x_values.as_slice().expect("contiguous"),
        w_values.as_slice().expect("contiguous"),
    );
    let y = flex_f32(y, shape);
    let state = (x_values, w_values, norm);
    Ok(checked(record::<_, 2, D>(
        RmsNormBackward,
        [&x_node, &w_node],
        state,
        y,
    )))
}

/// Each row's `1 / sqrt(mean(x^2) + eps)`.
#[derive(Debug)]
struct RmsRows {
    inverse_rms: Vec<f32>,
    hidden: usize,
}

impl RmsRows {
    fn new(x: &[f32], hidden: usize, eps: f32) -> Self {
        let inverse_rms = x
            .par_chunks(hidden)
            .map(|row| {
                let mean = row.iter().map(|x| x * x).sum::<f32>() / hidden as f32;
                1.0 / (mean + eps).sqrt()
            })
            .collect();
        Self {
            inverse_rms,
            hidden,
        }
    }

    fn forward(&self, x: &[f32], weight: &[f32]) -> Vec<f32> {
        let mut y = vec![0.0f32; x.len()];
        y.par_chunks_mut(self.hidden)
            .zip(x.par_chunks(self.hidden))
            .zip(&self.inverse_rms)
            .for_each(|((y, x), &inverse)| {
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(weight) {
                    *y = x * inverse * w;
                }
            });
        y
    }

    /// `dx = r · (dn − n · mean(dn ⊙ n))` with `n = x · r`, `dn = dy ⊙ weight`.
    fn backward_x(&self, x: &[f32], weight: &[f32], dy: &[f32]) -> Vec<f32> {
        let hidden = self.hidden;
        let mut dx = vec![0.0f32; x.len()];
        dx.par_chunks_mut(hidden)
            .zip(x.par_chunks(hidden).zip(dy.par_chunks(hidden)))
            .zip(&self.inverse_rms)
            .for_each(|((dx, (x, dy)), &r)| {
                let dot: f32 = x
                    .iter()
                    .zip(dy)
                    .zip(weight)
                    .map(|((x, dy), w)| dy * w * x * r)
                    .sum();
                let mean = dot / hidden as f32;
                for (((dx, &x), &dy), &w) in dx.iter_mut().zip(x).zip(dy).zip(weight) {
                    *dx = r * (dy * w - x * r * mean);
                }
            });
        dx
    }

    /// `dweight = Σ_rows dy ⊙ n`, summed over fixed blocks of rows, then the blocks in order.
    fn backward_weight(&self, x: &[f32], dy: &[f32]) -> Vec<f32> {
        let hidden = self.hidden;
        let block = rows_per_task(hidden) * hidden;
        let partials: Vec<Vec<f32>> = x
            .par_chunks(block)
            .zip(dy.par_chunks(block))
            .enumerate()
            .map(|(b, (x, dy))| {
                let first_row = b * block / hidden;
                let mut sum = vec![0.0f32; hidden];
                for (i, (x, dy)) in x.chunks(hidden).zip(dy.chunks(hidden)).enumerate() {
                    let r = self.inverse_rms[first_row + i];
                    for ((s, &x), &dy) in sum.iter_mut().zip(x).zip(dy) {
                        *s += dy * x * r;
                    }
                }
                sum
            })
            .collect();
        let mut total = vec![0.0f32; hidden];
        for partial in partials {
            total.iter_mut().zip(partial).for_each(|(t, p)| *t += p);
        }
        total
    }
}

#[derive(Debug)]
struct RmsNormBackward;

impl Backward<Cpu, 2> for RmsNormBackward {
    type State = (FlexTensor, FlexTensor, Arc<RmsRows>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, weight, norm) = ops.state;
        let (x_shape, w_shape) = (x.layout().shape().clone(), weight.layout().shape().clone());
        let (norm_x, x_for_w) = (norm.clone(), x.clone());
        binary::<Cpu, _, _>(
            ops.parents,
            ops.node,
            grads,
            |dy| {
                let dy = contiguous_f32(&dy);
                let dx = norm_x.backward_x(
                    x.as_slice().expect("kept contiguous"),
                    weight.as_slice().expect("kept contiguous"),
                    dy.as_slice().expect("contiguous"),
                );
                flex_f32(dx, x_shape)
            },
            |dy| {
                let dy = contiguous_f32(&dy);
                let dw = norm.backward_weight(
                    x_for_w.as_slice().expect("kept contiguous"),
                    dy.as_slice().expect("contiguous"),
                );
                flex_f32(dw, w_shape)
            },
        );
    }
}

// ---- SwiGLU's gate ------------------------------------------------------------------------------

/// `silu(gate) * up`, fused on the CPU backend (with or without autodiff); the inputs back
/// elsewhere.
#[allow(clippy::type_complexity)]
pub fn silu_gate<B: Backend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Result<Tensor<B, D>, (Tensor<B, D>, Tensor<B, D>)> {
    if on_cpu_inference::<B>(&[gate.dtype(), up.dtype()]) && gate.shape() == up.shape() {
        let shape = gate.shape();
        let (gate, up) = (cpu_values(gate), cpu_values(up));
        let (gate, up) = (contiguous_f32(&gate), contiguous_f32(&up));
        let [g, u] = [&gate, &up].map(|t| t.as_slice::<f32>().expect("contiguous"));
        let y = elementwise(g, u, g, |g, u, _| g * sigmoid(g) * u);
        return Ok(from_cpu_values(flex_f32(y, shape)));
    }
    if !on_cpu_autodiff::<B>(&[gate.dtype(), up.dtype()]) || gate.shape() != up.shape() {
        return Err((gate, up));
    }
    let shape = gate.shape();
    let (gate_node, up_node) = (cpu_node(gate), cpu_node(up));
    let gate_values = contiguous_f32(&gate_node.primitive);
    let up_values = contiguous_f32(&up_node.primitive);
    let (g, u) = (
        gate_values.as_slice::<f32>().expect("contiguous"),
        up_values.as_slice::<f32>().expect("contiguous"),
    );
    let y = elementwise(g, u, g, |g, u, _| g * sigmoid(g) * u);
    let y = flex_f32(y, shape);
    let state = (gate_values, up_values);
    Ok(checked(record::<_, 2, D>(
        SiluGateBackward,
        [&gate_node, &up_node],
        state,
        y,
    )))
}

/// `f(a, b, c)` element by element, over chunks split across the thread pool.
fn elementwise(
    a: &[f32],
    b: &[f32],
    c: &[f32],
    f: impl Fn(f32, f32, f32) -> f32 + Sync,
) -> Vec<f32> {
    const CHUNK: usize = ELEMENTS_PER_TASK;
    let mut out = vec![0.0f32; a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(
            a.par_chunks(CHUNK)
                .zip(b.par_chunks(CHUNK).zip(c.par_chunks(CHUNK))),
        )
        .for_each(|(out, (a, (b, c)))| {
            for (out, ((&a, &b), &c)) in out.iter_mut().zip(a.iter().zip(b).zip(c)) {
                *out = f(a, b, c);
            }
        });
    out
}

#[inline(always)] // into the element loops, so that they vectorise
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `d gate = dy · up · s · (1 + gate · (1 − s))`, `d up = dy · gate · s`, `s = sigmoid(gate)`.
#[derive(Debug)]
struct SiluGateBackward;

impl Backward<Cpu, 2> for SiluGateBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (gate, up) = ops.state;
        let shape = gate.layout().shape().clone();
        let slice = |t: &FlexTensor| -> FlexTensor { contiguous_f32(t) };
        let (gate_for_up, shape_for_up) = (gate.clone(), shape.clone());
        binary::<Cpu, _, _>(
            ops.parents,
            ops.node,
            grads,
            |dy| {
                let dy = slice(&dy);
                let [dy, g, u] =
                    [&dy, &gate, &up].map(|t| t.as_slice::<f32>().expect("contiguous"));
                let d_gate = elementwise(dy, g, u, |dy, g, u| {
                    let s = sigmoid(g);
                    dy * u * s * (1.0 + g * (1.0 - s))
                });
                flex_f32(d_gate, shape)
            },
            |dy| {
                let dy = slice(&dy);
                let [dy, g] = [&dy, &gate_for_up].map(|t| t.as_slice::<f32>().expect("contiguous"));
                flex_f32(
                    elementwise(dy, g, g, |dy, g, _| dy * g * sigmoid(g)),
                    shape_for_up,
                )
            },
        );
    }
}

// ---- rotary position embedding ---------------------------------------------------------------

/// `x * cos + rotate_half(x) * sin` over the last axis (`rotate_half(x) = [-x2, x1]`), for `x`
/// and the tables of one shape; fused on the CPU backend, with or without autodiff (the same
/// f32 operations as the composed form, so the same bits); `x` back elsewhere.
pub fn rope<B: Backend>(
    x: Tensor<B, 4>,
    cos: &Tensor<B, 4>,
    sin: &Tensor<B, 4>,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    let shape = x.shape();
    let dtypes = [x.dtype(), cos.dtype(), sin.dtype()];
    let (inference, autodiff) = (
        on_cpu_inference::<B>(&dtypes),
        on_cpu_autodiff::<B>(&dtypes),
    );
    if !(inference || autodiff) || cos.shape() != shape || sin.shape() != shape {
        return Err(x);
    }
    let head_dim = shape.dims::<4>()[3];
    let table = |t: &Tensor<B, 4>| -> FlexTensor {
        let inner = match same_type::<_, Tensor<CpuAutodiff, 4>>(t.clone()) {
            Ok(t) => t.inner(),
            Err(t) => checked(t),
        };
        contiguous_f32(&inner.into_primitive().tensor())
    };
    let (cos, sin) = (table(cos), table(sin));
    let forward = |x: &FlexTensor| -> FlexTensor {
        let x = contiguous_f32(x);
        let [x, c, s] = [&x, &cos, &sin].map(|t| t.as_slice::<f32>().expect("contiguous"));
        flex_f32(rotate_rows(x, c, s, head_dim, false), shape.clone())
    };
    match same_type::<_, Tensor<CpuAutodiff, 4>>(x) {
        Ok(x) => {
            let node = cpu_node(x);
            let y = forward(&node.primitive);
            Ok(checked(record::<_, 1, 4>(
                RopeBackward,
                [&node],
                (cos, sin),
                y,
            )))
        }
        Err(x) => Ok(from_cpu_values(forward(&cpu_values(x)))),
    }
}

/// Forward: `y_j = x_j c_j + r_j s_j` with `r = [-x2, x1]`. Backward (`transposed`), from
/// `dy` in place of `x`: `dx_j = dy_j c_j + t_j` with `t = [dy2 ⊙ s2, -(dy1 ⊙ s1)]`.
fn rotate_rows(x: &[f32], c: &[f32], s: &[f32], head_dim: usize, transposed: bool) -> Vec<f32> {
    let half = head_dim / 2;
    let rows = rows_per_task(head_dim) * head_dim;
    let mut y = vec![0.0f32; x.len()];
    y.par_chunks_mut(rows)
        .zip(
            x.par_chunks(rows)
                .zip(c.par_chunks(rows).zip(s.par_chunks(rows))),
        )
        .for_each(|(y, (x, (c, s)))| {
            for start in (0..y.len()).step_by(head_dim) {
                let (y, x) = (&mut y[start..start + head_dim], &x[start..start + head_dim]);
                let (c, s) = (&c[start..start + head_dim], &s[start..start + head_dim]);
                for j in 0..half {
                    let (first, second) = match transposed {
                        false => (-x[j + half] * s[j], x[j] * s[j + half]),
                        true => (x[j + half] * s[j + half], -(x[j] * s[j])),
                    };
                    y[j] = x[j] * c[j] + first;
                    y[j + half] = x[j + half] * c[j + half] + second;
                }
            }
        });
    y
}

#[derive(Debug)]
struct RopeBackward;

impl Backward<Cpu, 1> for RopeBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (cos, sin) = ops.state;
        unary::<Cpu, _>(ops.parents, ops.node, grads, |dy| {
            let shape = cos.layout().shape().clone();
            let head_dim = shape[shape.num_dims() - 1];
            let dy = contiguous_f32(&dy);
            let [dy, c, s] = [&dy, &cos, &sin].map(|t| t.as_slice::<f32>().expect("contiguous"));
            flex_f32(rotate_rows(dy, c, s, head_dim, true), shape)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::{log_softmax, softmax};
    use burn::tensor::Distribution;

    type AB = CpuAutodiff;

    fn random<const D: usize>(shape: [usize; D], seed: u64) -> Tensor<AB, D> {
        <AB as Backend>::seed(&Default::default(), seed);
        Tensor::random(shape, Distribution::Normal(0.0, 3.0), &Default::default())
    }

    fn max_difference<const D: usize>(a: Tensor<Cpu, D>, b: Tensor<Cpu, D>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    #[test]
    fn exp_is_within_a_few_ulp_of_libm_and_keeps_the_edges() {
        let ulps = |a: f32, b: f32| (a.to_bits() as i64 - b.to_bits() as i64).abs();
        let mut worst = 0;
        for i in 0..=400_000 {
            let x = -87.0 + 175.5 * i as f32 / 400_000.0;
            worst = worst.max(ulps(exp(x), x.exp()));
        }
        assert!(worst <= 3, "{worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::MIN), 0.0, "masked scores");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-88.0), 0.0, "below the normal range");
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn fused_softmax_matches_the_composed_one_forward_and_backward() {
        // 37 columns: rows do not line up with the thread pool's tasks.
        let x = random([3, 2, 50, 37], 1);
        let upstream = random([3, 2, 50, 37], 2).inner();
        let run = |fused: bool| {
            let x = Tensor::<AB, 4>::from_inner(x.clone().inner()).require_grad();
            let y = match fused {
                true => softmax_last(x.clone()),
                false => softmax(x.clone(), 3),
            };
            let loss = (y.clone() * Tensor::from_inner(upstream.clone())).sum();
            let grads = loss.backward();
            (y.inner(), x.grad(&grads).expect("x takes a gradient"))
        };
        let ((y_fused, dx_fused), (y_composed, dx_composed)) = (run(true), run(false));
        let (dy, dg) = (
            max_difference(y_fused, y_composed),
            max_difference(dx_fused, dx_composed.clone()),
        );
        let scale: f32 = dx_composed.abs().max().into_scalar();
        assert!(dy < 1e-6, "probabilities differ by {dy}");
        assert!(dg < 1e-5 * scale.max(1.0), "gradients differ by {dg}");
    }

    #[test]
    fn fused_cross_entropy_matches_the_composed_one_forward_and_backward() {
        let [batch, seq, vocab] = [2, 9, 61];
        let logits = random([batch, seq, vocab], 3);
        let device = Default::default();
        let targets: Vec<i32> = (0..batch * seq).map(|i| (i * 17 % vocab) as i32).collect();
        let targets =
            Tensor::<AB, 1, Int>::from_data(TensorData::new(targets, [batch * seq]), &device)
                .reshape([batch, seq]);
        // Some rows not selected, one counted twice (weights, not only a mask).
        let weights: Vec<f32> = (0..batch * seq).map(|i| [1.0, 0.0, 2.0][i % 3]).collect();
        let weights = Tensor::<AB, 1>::from_data(TensorData::new(weights, [batch * seq]), &device)
            .reshape([batch, seq]);
        let run = |fused: bool| {
            let x = Tensor::<AB, 3>::from_inner(logits.clone().inner()).require_grad();
            let loss = if fused {
                token_nll_sum(x.clone(), &targets, &weights).expect("the CPU autodiff path")
            } else {
                let picked = log_softmax(x.clone(), 2)
                    .gather(2, targets.clone().unsqueeze_dim::<3>(2))
                    .squeeze_dim::<2>(2);
                (picked * weights.clone()).sum().neg()
            };
            // An upstream gradient other than 1, as the mean over tokens gives.
            let grads = loss.clone().mul_scalar(0.25).backward();
            let dx = x.grad(&grads).expect("logits take a gradient");
            (loss.into_scalar(), dx)
        };
        let ((loss_fused, dx_fused), (loss_composed, dx_composed)) = (run(true), run(false));
        assert!(
            (loss_fused - loss_composed).abs() < 1e-5 * loss_composed.abs(),
            "{loss_fused} against {loss_composed}"
        );
        let dg = max_difference(dx_fused, dx_composed);
        assert!(dg < 1e-6, "gradients differ by {dg}");
    }

    #[test]
    fn the_fused_loss_is_taken_only_on_the_cpu_autodiff_backend() {
        let device = Default::default();
        let targets = Tensor::<Cpu, 2, Int>::zeros([1, 2], &device);
        let weights = Tensor::<Cpu, 2>::ones([1, 2], &device);
        let logits = Tensor::<Cpu, 3>::zeros([1, 2, 4], &device);
        assert!(token_nll_sum(logits, &targets, &weights).is_err());
        let tracked_weights = Tensor::<AB, 2>::ones([1, 2], &device).require_grad();
        let logits = Tensor::<AB, 3>::zeros([1, 2, 4], &device);
        let targets = Tensor::<AB, 2, Int>::zeros([1, 2], &device);
        assert!(token_nll_sum(logits, &targets, &tracked_weights).is_err());
    }

    /// Value and gradients of `Σ f(inputs) ⊙ upstream`, fused against composed.
    fn assert_same_gradients<const D: usize, const N: usize>(
        what: &str,
        inputs: [Tensor<Cpu, D>; N],
        fused: impl Fn(&[Tensor<AB, D>; N]) -> Tensor<AB, D>,
        composed: impl Fn(&[Tensor<AB, D>; N]) -> Tensor<AB, D>,
    ) {
        let run = |f: &dyn Fn(&[Tensor<AB, D>; N]) -> Tensor<AB, D>| {
            let tracked = inputs
                .clone()
                .map(|x| Tensor::<AB, D>::from_inner(x).require_grad());
            let y = f(&tracked);
            let upstream = Tensor::<AB, D>::from_inner(random(y.dims(), 99).inner());
            let grads = (y.clone() * upstream).sum().backward();
            let dx = tracked.map(|x| x.grad(&grads).expect("every input takes a gradient"));
            (y.inner(), dx)
        };
        let ((y_fused, d_fused), (y_composed, d_composed)) = (run(&fused), run(&composed));
        let scale = |t: &Tensor<Cpu, D>| -> f32 { t.clone().abs().max().into_scalar() };
        let dy = max_difference(y_fused, y_composed.clone());
        assert!(
            dy <= 1e-5 * scale(&y_composed).max(1.0),
            "{what}: outputs differ by {dy}"
        );
        for (i, (a, b)) in d_fused.into_iter().zip(d_composed).enumerate() {
            let tolerance = 1e-5 * scale(&b).max(1.0);
            let d = max_difference(a, b);
            assert!(
                d <= tolerance,
                "{what}: gradients of input {i} differ by {d}"
            );
        }
    }

    #[test]
    fn fused_rms_norm_matches_the_composed_one_forward_and_backward() {
        let x = random([3, 70, 48], 10).inner();
        // The weight spread as a [1, 1, 48] tensor, so that both inputs have rank 3.
        let weight = random([1, 1, 48], 11).inner();
        let eps = 1e-5;
        assert_same_gradients(
            "rms norm",
            [x, weight],
            |[x, w]| rms_norm(x.clone(), w.clone().reshape([48]), eps).expect("CPU autodiff"),
            |[x, w]| {
                let variance = x.clone().square().mean_dim(2);
                x.clone() * variance.add_scalar(eps).sqrt().recip() * w.clone()
            },
        );
    }

    #[test]
    fn fused_silu_gate_matches_the_composed_one_forward_and_backward() {
        let (gate, up) = (
            random([2, 33, 40], 12).inner(),
            random([2, 33, 40], 13).inner(),
        );
        assert_same_gradients(
            "silu gate",
            [gate, up],
            |[g, u]| silu_gate(g.clone(), u.clone()).expect("CPU autodiff"),
            |[g, u]| burn::tensor::activation::silu(g.clone()) * u.clone(),
        );
    }

    #[test]
    fn without_autodiff_the_fused_norm_and_gate_give_the_same_bits() {
        let (x, weight) = (random([3, 70, 48], 16).inner(), random([48], 17).inner());
        let (gate, up) = (
            random([2, 33, 40], 18).inner(),
            random([2, 33, 40], 19).inner(),
        );
        fn norm<B: Backend>(x: Tensor<B, 3>, weight: Tensor<B, 1>) -> Tensor<B, 3> {
            rms_norm(x, weight, 1e-5).expect("the CPU backend")
        }
        fn gated<B: Backend>(gate: Tensor<B, 3>, up: Tensor<B, 3>) -> Tensor<B, 3> {
            silu_gate(gate, up).expect("the CPU backend")
        }
        let tracked = |t: &Tensor<Cpu, 3>| Tensor::<AB, 3>::from_inner(t.clone());
        let plain = norm(x.clone(), weight.clone());
        let autodiff = norm(tracked(&x), Tensor::from_inner(weight)).inner();
        assert_eq!(plain.into_data(), autodiff.into_data(), "rms norm");
        let plain = gated(gate.clone(), up.clone());
        let autodiff = gated(tracked(&gate), tracked(&up)).inner();
        assert_eq!(plain.into_data(), autodiff.into_data(), "silu gate");
    }

    fn storage_address(t: &Tensor<Cpu, 4>) -> usize {
        t.clone()
            .into_primitive()
            .tensor()
            .storage::<f32>()
            .as_ptr() as usize
    }

    #[test]
    fn a_key_value_store_is_written_in_place_unless_shared() {
        let store = random([2, 3, 6, 4], 20).inner();
        // Strided, as keys come from the projections: [batch, seq, heads, dim] seen by head.
        let new = random([2, 2, 3, 4], 21).inner().swap_dims(1, 2);
        let want = store.clone().slice_assign(s![.., .., 3..5], new.clone());
        let address = storage_address(&store);
        let written = write_positions(store, 3, new.clone()).expect("in place");
        assert_eq!(storage_address(&written), address, "the same storage");
        assert_eq!(written.clone().into_data(), want.into_data());

        // Held elsewhere too: the other holder must not see the write.
        let held = written.clone();
        let before = held.clone().into_data();
        assert!(write_positions(written, 0, new.clone()).is_err());
        assert_eq!(held.clone().into_data(), before);
        // Past the capacity, or under autodiff: the caller's own path.
        assert!(write_positions(held, 5, new.clone()).is_err());
        let tracked = Tensor::<AB, 4>::from_inner(random([2, 3, 6, 4], 22).inner());
        assert!(write_positions(tracked, 0, Tensor::from_inner(new)).is_err());
    }

    #[test]
    fn fused_rope_matches_rotate_half_forward_and_backward() {
        let shape = [2, 7, 3, 16];
        let (cos, sin) = (random(shape, 14), random(shape, 15));
        let rotate_half = |x: Tensor<AB, 4>| {
            let x1 = x.clone().slice([0..2, 0..7, 0..3, 0..8]);
            let x2 = x.slice([0..2, 0..7, 0..3, 8..16]);
            Tensor::cat(vec![x2.neg(), x1], 3)
        };
        assert_same_gradients(
            "rope",
            [random(shape, 16).inner()],
            |[x]| rope(x.clone(), &cos, &sin).expect("CPU autodiff"),
            |[x]| x.clone() * cos.clone() + rotate_half(x.clone()) * sin.clone(),
        );
        // Without autodiff too.
        let x = random(shape, 17).inner();
        let (c, s) = (cos.clone().inner(), sin.clone().inner());
        let fused = rope(x.clone(), &c, &s).expect("CPU");
        let x1 = x.clone().slice([0..2, 0..7, 0..3, 0..8]);
        let x2 = x.clone().slice([0..2, 0..7, 0..3, 8..16]);
        let composed = x * c + Tensor::cat(vec![x2.neg(), x1], 3) * s;
        assert_eq!(fused.into_data(), composed.into_data());
    }

    #[test]
    fn fused_masked_softmax_matches_scale_mask_and_softmax() {
        let shape = [2, 3, 9, 11];
        // Causal-like blocks plus one row masked whole (a padding query).
        let blocked: Vec<bool> = (0..2 * 3 * 9 * 11)
            .map(|i| {
                let (row, key) = (i / 11 % 9, i % 11);
                key > row + 2 || row == 4
            })
            .collect();
        let blocked = Tensor::<AB, 1, Bool>::from_data(
            TensorData::new(blocked, [2 * 3 * 9 * 11]),
            &Default::default(),
        )
        .reshape(shape);
        let scale = 0.125f64;
        assert_same_gradients(
            "masked softmax",
            [random(shape, 18).inner()],
            |[x]| masked_softmax(x.clone(), &blocked, scale).expect("CPU autodiff"),
            |[x]| {
                softmax(
                    x.clone()
                        .mul_scalar(scale)
                        .mask_fill(blocked.clone(), f32::MIN),
                    3,
                )
            },
        );
    }

    #[test]
    #[should_panic(expected = "outside the vocabulary")]
    fn a_target_outside_the_vocabulary_is_named() {
        let device = Default::default();
        let logits = Tensor::<AB, 3>::zeros([1, 1, 4], &device);
        let targets = Tensor::<AB, 2, Int>::from_ints([[4]], &device);
        let weights = Tensor::<AB, 2>::ones([1, 1], &device);
        let _ = token_nll_sum(logits, &targets, &weights);
    }
}
