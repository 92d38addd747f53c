//! The matrix products of the fused ops: the `gemm` crate (which burn-flex itself calls) on
//! matrices read and written in place through their strides, so that no operand is copied
//! into another layout first.

use burn_flex::FlexTensor;

/// An f32 (or bool) tensor of the CPU backend read in place through its strides.
pub(super) struct Strided<'a, T> {
    pub(super) data: &'a [T],
    offset: isize,
    strides: Vec<isize>,
}

impl<'a> Strided<'a, f32> {
    pub(super) fn of(tensor: &'a FlexTensor) -> Self {
        Self::with(tensor.storage::<f32>(), tensor)
    }
}

impl<'a, T> Strided<'a, T> {
    pub(super) fn with(data: &'a [T], tensor: &FlexTensor) -> Self {
        let layout = tensor.layout();
        // A dimension of size 1 is broadcast: its index is always 0, whatever its stride.
        let strides = layout
            .strides()
            .iter()
            .zip(layout.shape().iter())
            .map(|(&stride, &size)| if size == 1 { 0 } else { stride })
            .collect();
        Self {
            data,
            offset: layout.start_offset() as isize,
            strides,
        }
    }

    /// The element at `index` (leading axes; the rest 0).
    pub(super) fn position(&self, index: &[usize]) -> isize {
        self.offset
            + index
                .iter()
                .zip(&self.strides)
                .map(|(&i, &stride)| i as isize * stride)
                .sum::<isize>()
    }

    /// The stride of the last axis (0 where it is broadcast).
    pub(super) fn last_stride(&self) -> isize {
        self.strides[self.strides.len() - 1]
    }

    /// The matrix over the last two axes at index `leading` of the others: its first element
    /// and the strides of its rows and columns.
    pub(super) fn matrix(&self, leading: &[usize]) -> Matrix<T> {
        let start = self.position(leading);
        debug_assert!(start >= 0 && (start as usize) < self.data.len());
        let axes = self.strides.len();
        Matrix {
            // In bounds: the layout describes this tensor's own storage.
            start: unsafe { self.data.as_ptr().offset(start) }.cast_mut(),
            row_stride: self.strides[axes - 2],
            column_stride: self.strides[axes - 1],
        }
    }
}

/// A matrix in memory: its first element and the strides of its rows and columns.
#[derive(Clone, Copy)]
pub(super) struct Matrix<T> {
    pub(super) start: *mut T,
    pub(super) row_stride: isize,
    pub(super) column_stride: isize,
}

/// An output buffer the tasks of the thread pool write into, each into its own heads' parts.
#[derive(Clone, Copy)]
pub(super) struct Shared(*mut f32);

// Each task writes only its own (sequence, key/value head)'s elements.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// The pointer (a method, so that closures capture the whole `Shared`).
    pub(super) fn ptr(self) -> *mut f32 {
        self.0
    }
}

impl<T> Matrix<T> {
    pub(super) fn transposed(self) -> Self {
        Self {
            row_stride: self.column_stride,
            column_stride: self.row_stride,
            ..self
        }
    }
}

impl Matrix<f32> {
    /// A contiguous `[rows, columns]` block of `buffer` from `start`.
    pub(super) fn rows_of(buffer: *mut f32, start: usize, columns: usize) -> Self {
        Self {
            start: buffer.wrapping_add(start),
            row_stride: columns as isize,
            column_stride: 1,
        }
    }

    /// Head `head`'s `[seq, head_dim]` matrix of sequence `b` in a `[batch, seq, heads,
    /// head_dim]` buffer.
    pub(super) fn head_of(buffer: *mut f32, dims: [usize; 4], b: usize, head: usize) -> Self {
        let [_, seq, heads, head_dim] = dims;
        Self {
            start: buffer.wrapping_add((b * seq * heads + head) * head_dim),
            row_stride: (heads * head_dim) as isize,
            column_stride: 1,
        }
    }
}

/// `dst = lhs · rhs` (`[m, k] · [k, n]`), or `dst += lhs · rhs` when `accumulate`. Each
/// element of `dst` is summed in the same order whatever `parallelism` says.
///
/// Safety: each matrix lies within its buffer, and no other thread writes `dst`'s elements.
pub(super) unsafe fn product(
    [m, n, k]: [usize; 3],
    dst: Matrix<f32>,
    lhs: Matrix<f32>,
    rhs: Matrix<f32>,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.start,
            dst.column_stride,
            dst.row_stride,
            accumulate,
            lhs.start,
            lhs.column_stride,
            lhs.row_stride,
            rhs.start,
            rhs.column_stride,
            rhs.row_stride,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// A buffer of `len` f32s that products fill. Its elements start unset rather than zeroed
/// (zeroing them took ~2% of a training step); it becomes a `Vec` once all are written.
pub(super) struct OutputBuffer {
    values: Vec<f32>,
    len: usize,
}

impl OutputBuffer {
    pub(super) fn new(len: usize) -> Self {
        Self {
            values: Vec::with_capacity(len),
            len,
        }
    }

    /// Where the elements go (writes only, until [`written`](Self::written)).
    pub(super) fn shared(&mut self) -> Shared {
        Shared(self.values.as_mut_ptr())
    }

    /// The values.
    ///
    /// Safety: every one of the `len` elements has been written through `shared`.
    pub(super) unsafe fn written(mut self) -> Vec<f32> {
        unsafe { self.values.set_len(self.len) };
        self.values
    }
}
