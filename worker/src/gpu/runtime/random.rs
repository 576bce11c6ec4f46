//! Random values made on the device, for kernel checks and benchmarks at full size.

use cudarc::driver::{CudaSlice, PushKernelArg};
use half::bf16;

use super::{Fp8, Gpu, queue, strided};
use crate::error::Result;

impl Gpu {
    /// `n` values uniform in [−scale, scale), made on the device.
    pub fn random_bf16(&self, n: usize, seed: u64, scale: f32) -> Result<CudaSlice<bf16>> {
        self.random("fill_random_bf16", n, seed, scale)
    }
    pub fn random_f32(&self, n: usize, seed: u64, scale: f32) -> Result<CudaSlice<f32>> {
        self.random("fill_random_f32", n, seed, scale)
    }
    pub fn random_fp8(&self, n: usize, seed: u64, scale: f32) -> Result<CudaSlice<Fp8>> {
        self.random("fill_random_fp8", n, seed, scale)
    }

    fn random<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        kernel: &str,
        n: usize,
        seed: u64,
        scale: f32,
    ) -> Result<CudaSlice<T>> {
        let mut out = self.stream.alloc_zeros::<T>(n)?;
        let mut launch = self.stream.launch_builder(self.function(kernel));
        launch.arg(&mut out).arg(&n).arg(&seed).arg(&scale);
        queue(launch, strided(n, 256))?;
        Ok(out)
    }
}
