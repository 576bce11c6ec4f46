//! Dense GEMMs through cuBLAS: a linear layer, and strided batches of products whose
//! operands sit anywhere in their buffers.

use cudarc::cublas::sys::{cublasOperation_t, cudaDataType};
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use half::bf16;

use super::Gpu;
use crate::ensure;
use crate::error::Result;

/// Element types cuBLAS multiplies here.
pub trait GemmType: cudarc::driver::DeviceRepr {
    const DTYPE: cudaDataType;
}

impl GemmType for f32 {
    const DTYPE: cudaDataType = cudaDataType::CUDA_R_32F;
}

impl GemmType for bf16 {
    const DTYPE: cudaDataType = cudaDataType::CUDA_R_16BF;
}

/// Where a row-major GEMM operand's matrices sit in their buffer, in elements: the first
/// one's offset, the stride between rows, and between the matrices of a batch.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    pub offset: usize,
    pub row_stride: usize,
    pub batch_stride: usize,
}

impl Layout {
    /// One matrix from the buffer's start.
    pub fn dense(row_stride: usize) -> Self {
        Layout {
            offset: 0,
            row_stride,
            batch_stride: 0,
        }
    }

    /// One past the last element a batch of `rows` × `cols` matrices reaches.
    fn reach(&self, rows: usize, cols: usize, batch: usize) -> usize {
        if rows == 0 || cols == 0 || batch == 0 {
            return 0;
        }
        self.offset + (batch - 1) * self.batch_stride + (rows - 1) * self.row_stride + cols
    }
}

/// A GEMM operand as cuBLAS takes it: a device address and element type, with its strides.
#[derive(Clone, Copy)]
struct Operand {
    ptr: u64,
    dtype: cudaDataType,
    row_stride: usize,
    batch_stride: usize,
}

impl Operand {
    fn at<T: GemmType>(ptr: u64, layout: Layout) -> Self {
        Operand {
            ptr: ptr + (layout.offset * std::mem::size_of::<T>()) as u64,
            dtype: T::DTYPE,
            row_stride: layout.row_stride,
            batch_stride: layout.batch_stride,
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
}

impl Gpu {
    /// Dense y[rows, out] = x[rows, inp] · w[out, inp]ᵀ through cuBLAS, f32 accumulation;
    /// bf16 or f32 in, bf16 or f32 out.
    pub fn linear<X: GemmType, Y: GemmType>(
        &self,
        x: &CudaSlice<X>,
        w: &CudaSlice<X>,
        y: &mut CudaSlice<Y>,
        (rows, out, inp): (usize, usize, usize),
    ) -> Result<()> {
        ensure!(
            x.len() == rows * inp && w.len() == out * inp && y.len() == rows * out,
            "linear: x must be [{rows}, {inp}], w [{out}, {inp}], y [{rows}, {out}]"
        );
        let shape = GemmShape {
            m: rows,
            n: out,
            k: inp,
            batch: 1,
        };
        self.batched_gemm(
            (x, Layout::dense(inp)),
            (w, Layout::dense(inp)),
            true,
            (y, Layout::dense(out)),
            shape,
        )
    }

    /// Row-major y[b] (m × n) = x[b] (m × k) · (w[b]ᵀ if `w_is_nk`, w[b] [k, n] otherwise)
    /// for b < batch, each operand where its layout says in its buffer (per-head products
    /// over slices of wider rows, say); checked to stay inside every buffer.
    pub fn batched_gemm<X: GemmType, Y: GemmType>(
        &self,
        (x, x_at): (&CudaSlice<X>, Layout),
        (w, w_at): (&CudaSlice<X>, Layout),
        w_is_nk: bool,
        (y, y_at): (&mut CudaSlice<Y>, Layout),
        shape: GemmShape,
    ) -> Result<()> {
        let GemmShape { m, n, k, batch } = shape;
        let (w_rows, w_cols) = if w_is_nk { (n, k) } else { (k, n) };
        ensure!(
            x_at.row_stride >= k
                && w_at.row_stride >= w_cols
                && y_at.row_stride >= n
                && x_at.reach(m, k, batch) <= x.len()
                && w_at.reach(w_rows, w_cols, batch) <= w.len()
                && y_at.reach(m, n, batch) <= y.len(),
            "gemm {shape:?}: an operand runs past its buffer (x {x_at:?} of {}, w {w_at:?} of \
             {}, y {y_at:?} of {})",
            x.len(),
            w.len(),
            y.len()
        );
        let (xp, _x) = x.device_ptr(&self.stream);
        let (wp, _w) = w.device_ptr(&self.stream);
        let (yp, _y) = y.device_ptr_mut(&self.stream);
        // SAFETY: every operand's matrices lie inside its buffer (checked above).
        unsafe {
            self.gemm(
                Operand::at::<X>(xp, x_at),
                Operand::at::<X>(wp, w_at),
                w_is_nk,
                Operand::at::<Y>(yp, y_at),
                shape,
            )
        }
    }

    /// Row-major y[b] (m × n) = x[b] (m × k) · (w[b]ᵀ if `w_is_nk`, w[b] [k, n] otherwise)
    /// for b < batch, with f32 accumulation: cuBLAS is column-major, so it computes
    /// yᵀ = op(w)ᵀ · xᵀ on the same memory.
    ///
    /// # Safety
    /// Every operand's pointer must hold its matrices as its strides and the shape say.
    unsafe fn gemm(
        &self,
        x: Operand,
        w: Operand,
        w_is_nk: bool,
        y: Operand,
        GemmShape { m, n, k, batch }: GemmShape,
    ) -> Result<()> {
        use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t};
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        let (one, zero) = (1f32, 0f32);
        let transpose = if w_is_nk {
            cublasOperation_t::CUBLAS_OP_T
        } else {
            cublasOperation_t::CUBLAS_OP_N
        };
        // SAFETY: the caller vouches for the operands; alpha and beta are f32 as the f32
        // compute type requires.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *self.blas.handle(),
                transpose,
                cublasOperation_t::CUBLAS_OP_N,
                n as i32,
                m as i32,
                k as i32,
                (&one as *const f32).cast(),
                w.ptr as *const _,
                w.dtype,
                w.row_stride as i32,
                w.batch_stride as i64,
                x.ptr as *const _,
                x.dtype,
                x.row_stride as i32,
                x.batch_stride as i64,
                (&zero as *const f32).cast(),
                y.ptr as *mut _,
                y.dtype,
                y.row_stride as i32,
                y.batch_stride as i64,
                batch as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_layout_reaches_its_last_matrix_last_row_end() {
        // 3 heads of a [rows=2, heads × 4] buffer, 3 columns each
        let per_head = Layout {
            offset: 1,
            row_stride: 12,
            batch_stride: 4,
        };
        assert_eq!(per_head.reach(2, 3, 3), 1 + 2 * 4 + 12 + 3);
        assert_eq!(Layout::dense(5).reach(4, 5, 1), 20);
        assert_eq!(Layout::dense(5).reach(0, 5, 1), 0);
    }
}
