//! A linear layer's product `x · wᵀ` (`w` stored `[out, in]`, as Hugging Face stores it) as
//! one op on the CPU backend under autodiff, with its own backward pass.
//!
//! Ours because the composed form (`x.matmul(w.transpose())`) hands back the weight's gradient
//! transposed, `(xᵀ · dy)ᵀ`, which is then copied into the weight's layout on one thread for
//! every weight of every step. Here `dw = dyᵀ · x` is written in the weight's own layout, and
//! `dx = dy · w` reads `w` in place.

use super::products::{product, Matrix, OutputBuffer, Strided};
use super::{checked, cpu_node, flex_f32, on_cpu_autodiff, record};
use crate::backend::Cpu;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::prelude::*;
use burn_flex::FlexTensor;

/// `x · wᵀ` for `x: [rows, in]` and `w: [out, in]`: fused on the CPU backend under autodiff;
/// the inputs back elsewhere.
#[allow(clippy::type_complexity)]
pub fn matmul_transposed<B: Backend>(
    x: Tensor<B, 2>,
    w: Tensor<B, 2>,
) -> Result<Tensor<B, 2>, (Tensor<B, 2>, Tensor<B, 2>)> {
    let ([rows, d_in], [d_out, w_in]) = (x.dims(), w.dims());
    if d_in != w_in || !on_cpu_autodiff::<B>(&[x.dtype(), w.dtype()]) {
        return Err((x, w));
    }
    let (x, w) = (cpu_node(x), cpu_node(w));
    let y = times(
        [rows, d_out, d_in],
        [&x.primitive, &w.primitive],
        [false, true],
    );
    let state = (x.primitive.clone(), w.primitive.clone());
    Ok(checked(record::<_, 2, 2>(
        LinearBackward,
        [&x, &w],
        state,
        y,
    )))
}

/// `a · b` (each transposed first where `transposed` says) as a new `[m, n]` tensor.
fn times([m, n, k]: [usize; 3], [a, b]: [&FlexTensor; 2], transposed: [bool; 2]) -> FlexTensor {
    let operand = |tensor: &FlexTensor, transposed: bool| {
        let matrix = Strided::of(tensor).matrix(&[]);
        match transposed {
            true => matrix.transposed(),
            false => matrix,
        }
    };
    let (lhs, rhs) = (operand(a, transposed[0]), operand(b, transposed[1]));
    let mut y = OutputBuffer::new(m * n);
    // As burn-flex decides: the thread pool only for products big enough to gain from it.
    let parallelism = match m * n * k >= 192 * 192 * 192 {
        true => gemm::Parallelism::Rayon(0),
        false => gemm::Parallelism::None,
    };
    // Safety: the operands lie in their tensors' storage, `y` is `[m, n]` and ours alone.
    unsafe {
        product(
            [m, n, k],
            Matrix::rows_of(y.shared().ptr(), 0, n),
            lhs,
            rhs,
            false,
            parallelism,
        );
    }
    // Safety: the product wrote all of `y` (zeros when `k` is 0).
    flex_f32(unsafe { y.written() }, Shape::new([m, n]))
}

/// `dx = dy · w`, `dw = dyᵀ · x`.
#[derive(Debug)]
struct LinearBackward;

impl Backward<Cpu, 2> for LinearBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, w) = ops.state;
        let dy = grads.consume::<Cpu>(&ops.node);
        let [rows, d_in] = x.layout().shape().dims::<2>();
        let d_out = w.layout().shape()[0];
        let [x_parent, w_parent] = ops.parents;
        if let Some(parent) = x_parent {
            let dx = times([rows, d_in, d_out], [&dy, &w], [false, false]);
            grads.register::<Cpu>(parent.id, dx);
        }
        if let Some(parent) = w_parent {
            let dw = times([d_out, d_in, rows], [&dy, &x], [true, false]);
            grads.register::<Cpu>(parent.id, dw);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{assert_close, spread_values};
    use super::*;
    use crate::backend::CpuAutodiff;

    type AB = CpuAutodiff;

    fn values(rows: usize, columns: usize, seed: usize) -> Tensor<Cpu, 2> {
        let values = spread_values(rows * columns, seed);
        Tensor::from_data(
            TensorData::new(values, [rows, columns]),
            &Default::default(),
        )
    }

    /// `y`, `dx` and `dw` against a fixed upstream gradient, for `x` given transposed in
    /// memory (a strided view, as attention's merged heads can be).
    fn run(fused: bool, [rows, d_in, d_out]: [usize; 3]) -> [Tensor<Cpu, 2>; 3] {
        let x = Tensor::<AB, 2>::from_inner(values(d_in, rows, 1).transpose()).require_grad();
        let w = Tensor::<AB, 2>::from_inner(values(d_out, d_in, 2)).require_grad();
        let upstream = Tensor::<AB, 2>::from_inner(values(rows, d_out, 3));
        let y = match fused {
            true => matmul_transposed(x.clone(), w.clone())
                .unwrap_or_else(|_| panic!("the CPU autodiff path")),
            false => x.clone().matmul(w.clone().transpose()),
        };
        let grads = (y.clone() * upstream).sum().backward();
        let grad = |t: &Tensor<AB, 2>| t.grad(&grads).expect("takes a gradient");
        [y.inner(), grad(&x), grad(&w)]
    }

    #[test]
    fn fused_linear_matches_the_composed_product_forward_and_backward() {
        for dims in [[7, 5, 3], [67, 200, 130]] {
            let (fused, composed) = (run(true, dims), run(false, dims));
            for (name, (a, b)) in ["y", "dx", "dw"]
                .iter()
                .zip(fused.into_iter().zip(composed))
            {
                assert_close(&format!("{name} {dims:?}"), a, b, 1e-5);
            }
        }
    }

    #[test]
    fn the_weight_gradient_comes_in_the_weight_layout() {
        let [_, _, dw] = run(true, [7, 5, 3]);
        assert!(dw.into_primitive().tensor().is_contiguous());
    }

    #[test]
    fn fused_linear_gives_the_same_bits_on_any_number_of_threads() {
        // Big enough for the product to use the thread pool.
        let on = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| run(true, [300, 256, 200]))
                .map(|t| t.into_data())
        };
        assert_eq!(on(1), on(3));
    }
}
