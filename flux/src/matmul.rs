//! Matrix products of half-precision operands with f32 results: what chunked attention needs to
//! keep its scores and gradients in f32 while its products run on tensor cores.
//!
//! Upcasting bf16 operands to f32 first gives the same values (a bf16 x bf16 product is exact
//! in f32), but on a GPU it turns each product into an f32 GEMM on the CUDA cores, an order of
//! magnitude below the tensor cores' rate, and it writes an f32 copy of every operand. On CUDA
//! the product is one `cublasGemmStridedBatchedEx` call with bf16 (or f16) inputs, f32 output and
//! f32 accumulation (FlashAttention's precision); operands may be transposed or row-sliced views,
//! so K^T and a chunk of Q are read in place. On the CPU the operands are upcast (same values up
//! to summation order). f32 and f64 operands use candle's matmul unchanged.
//!
//! No backward: chunked attention calls this on detached tensors and writes its own backward.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// `a @ b` for `a` [..., m, k] and `b` [..., k, n] with equal batch dims; f32 result for bf16 or
/// f16 operands (both of one dtype), the operands' dtype otherwise.
pub fn matmul_f32_out(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match a.dtype() {
        DType::BF16 | DType::F16 => {
            #[cfg(feature = "cuda")]
            if a.device().is_cuda() {
                return Ok(a.apply_op2_no_bwd(b, &cuda::HalfMatmulF32)?);
            }
            Ok(a.to_dtype(DType::F32)?.matmul(&b.to_dtype(DType::F32)?)?)
        }
        _ => Ok(a.matmul(b)?),
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc;
    use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape};
    use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t};
    use cudarc::driver::{DevicePtr, DevicePtrMut};

    /// The CUDA product (module docs).
    pub(super) struct HalfMatmulF32;

    /// One operand as cuBLAS sees it: a batch of row-major matrices, each stored either as is
    /// (`transposed == false`, rows `ld` apart) or as the transpose of a row-major matrix.
    #[derive(Debug)]
    struct Operand {
        batch: usize,
        batch_stride: usize,
        rows: usize,
        cols: usize,
        transposed: bool,
        ld: usize,
    }

    impl Operand {
        fn of(l: &Layout) -> candle_core::Result<Self> {
            let dims = l.dims();
            let strides = l.stride();
            let r = dims.len();
            if r < 2 {
                candle_core::bail!("half matmul: operands need 2 dims or more, got {dims:?}");
            }
            let (rows, cols) = (dims[r - 2], dims[r - 1]);
            let (sr, sc) = (strides[r - 2], strides[r - 1]);
            let (transposed, ld) = if (sc == 1 || cols == 1) && (sr >= cols || rows == 1) {
                (false, sr.max(cols))
            } else if (sr == 1 || rows == 1) && sc >= rows {
                (true, sc.max(rows))
            } else {
                candle_core::bail!(
                    "half matmul: the last two dims of {dims:?} (strides {strides:?}) are not a matrix or its transpose"
                );
            };
            // Batch dims must collapse to one stride (size-1 dims are free).
            let batch_dims: Vec<(usize, usize)> = dims[..r - 2]
                .iter()
                .zip(&strides[..r - 2])
                .filter(|(d, _)| **d > 1)
                .map(|(d, s)| (*d, *s))
                .collect();
            for pair in batch_dims.windows(2) {
                if pair[0].1 != pair[1].1 * pair[1].0 {
                    candle_core::bail!(
                        "half matmul: batch dims of {dims:?} (strides {strides:?}) do not collapse"
                    );
                }
            }
            Ok(Self {
                batch: dims[..r - 2].iter().product(),
                batch_stride: batch_dims.last().map_or(0, |(_, s)| *s),
                rows,
                cols,
                transposed,
                ld,
            })
        }

        /// Elements from the first to one past the last one read.
        fn extent(&self) -> usize {
            let (major, minor) = if self.transposed {
                (self.cols, self.rows)
            } else {
                (self.rows, self.cols)
            };
            (self.batch - 1) * self.batch_stride + (major - 1) * self.ld + minor
        }

        /// cuBLAS is column-major: a row-major matrix is its transpose there, so an operand
        /// stored as is enters as `N` and a transposed one as `T`.
        fn op(&self) -> cublasOperation_t {
            if self.transposed {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        }
    }

    fn to_i32(v: usize, what: &str) -> candle_core::Result<i32> {
        i32::try_from(v)
            .map_err(|_| candle_core::Error::Msg(format!("half matmul: {what} {v} exceeds i32")))
    }

    impl CustomOp2 for HalfMatmulF32 {
        fn name(&self) -> &'static str {
            "half-matmul-f32-out"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!(
                "half matmul: the CUDA op was given CPU tensors (the CPU upcasts instead)"
            )
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let (a, b) = (Operand::of(l1)?, Operand::of(l2)?);
            if a.cols != b.rows
                || a.batch != b.batch
                || l1.dims()[..l1.dims().len() - 2] != l2.dims()[..l2.dims().len() - 2]
            {
                candle_core::bail!(
                    "half matmul: shapes {:?} and {:?} do not multiply (equal batch dims required)",
                    l1.dims(),
                    l2.dims()
                );
            }
            let (m, k, n, batch) = (a.rows, a.cols, b.cols, a.batch);
            let dtype = match (s1.dtype(), s2.dtype()) {
                (DType::BF16, DType::BF16) => cudarc::cublas::sys::cudaDataType_t::CUDA_R_16BF,
                (DType::F16, DType::F16) => cudarc::cublas::sys::cudaDataType_t::CUDA_R_16F,
                (x, y) => candle_core::bail!(
                    "half matmul: takes two bf16 or two f16 operands, not {x:?} and {y:?}"
                ),
            };
            let dev = s1.device().clone();
            let stream = dev.cuda_stream();
            let blas = dev.cublas_handle();
            let mut out = unsafe { dev.alloc::<f32>(batch * m * n)? };
            let one = 1.0f32;
            let zero = 0.0f32;
            // Row-major C = A B is column-major C^T = B^T A^T: cuBLAS gets B first.
            let (mm, nn, kk) = (to_i32(n, "n")?, to_i32(m, "m")?, to_i32(k, "k")?);
            let (lda, ldb, ldc) = (to_i32(b.ld, "ld")?, to_i32(a.ld, "ld")?, mm);
            let batch_i = to_i32(batch, "batch")?;
            macro_rules! launch {
                ($t:ty) => {{
                    let av = s1
                        .as_cuda_slice::<$t>()?
                        .slice(l1.start_offset()..l1.start_offset() + a.extent());
                    let bv = s2
                        .as_cuda_slice::<$t>()?
                        .slice(l2.start_offset()..l2.start_offset() + b.extent());
                    let (ap, _ga) = av.device_ptr(&stream);
                    let (bp, _gb) = bv.device_ptr(&stream);
                    let (cp, _gc) = out.device_ptr_mut(&stream);
                    // Safety: the views cover every element the strides reach (`extent`), the
                    // output holds batch x m x n f32, and the types match the descriptors.
                    unsafe {
                        cudarc::cublas::result::gemm_strided_batched_ex(
                            *blas.handle(),
                            b.op(),
                            a.op(),
                            mm,
                            nn,
                            kk,
                            &one as *const f32 as *const _,
                            bp as *const _,
                            dtype,
                            lda,
                            b.batch_stride as i64,
                            ap as *const _,
                            dtype,
                            ldb,
                            a.batch_stride as i64,
                            &zero as *const f32 as *const _,
                            cp as *mut _,
                            cudarc::cublas::sys::cudaDataType_t::CUDA_R_32F,
                            ldc,
                            (m * n) as i64,
                            batch_i,
                            cublasComputeType_t::CUBLAS_COMPUTE_32F,
                            cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
                        )
                    }
                    .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
                }};
            }
            match s1.dtype() {
                DType::BF16 => launch!(half::bf16),
                _ => launch!(half::f16),
            }
            let mut shape = l1.dims().to_vec();
            let r = shape.len();
            shape[r - 1] = n;
            Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from(shape)))
        }
    }

    #[cfg(test)]
    mod tests {
        use super::Operand;
        use candle_core::Layout;

        #[test]
        fn operands_are_read_in_place() {
            // A chunk of rows of a contiguous [2, 3, 10, 4]: batch stride 40, ld 4.
            let l = Layout::contiguous((2, 3, 10, 4)).narrow(2, 5, 3).unwrap();
            let o = Operand::of(&l).unwrap();
            assert_eq!(
                (o.batch, o.batch_stride, o.rows, o.cols, o.transposed, o.ld),
                (6, 40, 3, 4, false, 4)
            );
            // K^T of a contiguous [2, 3, 10, 4]: transposed, ld 4.
            let t = Layout::contiguous((2, 3, 10, 4)).transpose(2, 3).unwrap();
            let o = Operand::of(&t).unwrap();
            assert_eq!(
                (o.batch, o.batch_stride, o.rows, o.cols, o.transposed, o.ld),
                (6, 40, 4, 10, true, 4)
            );
            assert_eq!(o.extent(), 5 * 40 + 9 * 4 + 4);
            // Heads and tokens swapped: batch dims do not collapse.
            let bad = Layout::contiguous((2, 3, 10, 4)).transpose(1, 2).unwrap();
            assert!(Operand::of(&bad).is_err());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::max_diff;

    /// The CPU path upcasts: bf16 operands give the f32 product of their exact values.
    #[test]
    fn half_operands_give_the_f32_product_of_their_values() {
        let a = crate::test_util::uniform(&[2, 3, 5, 8], 1, 1.0)
            .to_dtype(DType::BF16)
            .unwrap();
        let b = crate::test_util::uniform(&[2, 3, 6, 8], 2, 1.0)
            .to_dtype(DType::BF16)
            .unwrap();
        let bt = b.t().unwrap();
        let y = matmul_f32_out(&a, &bt).unwrap();
        assert_eq!(y.dtype(), DType::F32);
        let exact = a
            .to_dtype(DType::F64)
            .unwrap()
            .matmul(&bt.to_dtype(DType::F64).unwrap())
            .unwrap();
        assert!(max_diff(&y.to_dtype(DType::F64).unwrap(), &exact) < 1e-5);
        let f = crate::test_util::uniform(&[4, 3], 3, 1.0);
        let g = crate::test_util::uniform(&[3, 2], 4, 1.0);
        assert_eq!(matmul_f32_out(&f, &g).unwrap().dtype(), DType::F64);
    }

    /// The cuBLAS product against the CPU for every operand form chunked attention uses: a row
    /// chunk times a transposed view, a transposed chunk times a chunk, plain products; bf16 and
    /// f16. Built with the `cuda` feature; says it did not run where no CUDA device opens.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_half_matmul_matches_the_cpu() {
        use candle_core::Device;
        let Ok(gpu) = Device::new_cuda(0) else {
            eprintln!("not run: no CUDA device");
            return;
        };
        let q = crate::test_util::uniform(&[1, 3, 70, 32], 5, 1.0);
        let k = crate::test_util::uniform(&[1, 3, 70, 32], 6, 1.0);
        let p = crate::test_util::uniform(&[1, 3, 20, 70], 7, 1.0);
        for dt in [DType::BF16, DType::F16] {
            type Operands = fn(&Tensor, &Tensor, &Tensor) -> (Tensor, Tensor);
            let cases: [(&str, Operands); 3] = [
                ("chunk q @ k^T", |q, k, _| {
                    (q.narrow(2, 33, 20).unwrap(), k.t().unwrap())
                }),
                ("p @ v", |_, k, p| (p.clone(), k.clone())),
                ("p^T @ chunk", |q, _, p| {
                    (p.t().unwrap(), q.narrow(2, 10, 20).unwrap())
                }),
            ];
            for (name, make) in &cases {
                let on = |d: &Device| {
                    let c = |t: &Tensor| t.to_dtype(dt).unwrap().to_device(d).unwrap();
                    let (a, b) = make(&c(&q), &c(&k), &c(&p));
                    matmul_f32_out(&a, &b)
                        .unwrap()
                        .to_device(&Device::Cpu)
                        .unwrap()
                };
                let (cpu, cuda) = (on(&Device::Cpu), on(&gpu));
                assert_eq!(cuda.dtype(), DType::F32);
                let d = crate::test_util::rel_diff(&cpu, &cuda);
                eprintln!("half matmul {dt:?} {name}: max |cuda - cpu| / max |cpu| = {d:.3e} (bound 1e-5)");
                assert!(d < 1e-5, "{dt:?} {name}: {d}");
            }
        }
    }
}
