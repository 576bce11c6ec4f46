//! GPU products as the `nvidia.com/gpu.product` node label names them, and what they can run.

use crate::api::Dtype;

/// GPU generations the worker has kernels for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuArch {
    /// sm_80: A100, A800, A30. bf16 compute; FP8 checkpoints are dequantised.
    Ampere,
    /// sm_89: L40S, L4. Native FP8.
    Ada,
    /// sm_90: H100, H200, H800, H20, GH200. Native FP8.
    Hopper,
    /// sm_100: B200, GB200. Native FP8.
    Blackwell,
}

/// Product families by the model token in the label, most specific first
/// (`GH200` before `H200`, `H200` before `H20`).
const FAMILIES: &[(&str, GpuArch)] = &[
    ("GB200", GpuArch::Blackwell),
    ("B200", GpuArch::Blackwell),
    ("B100", GpuArch::Blackwell),
    ("GH200", GpuArch::Hopper),
    ("H200", GpuArch::Hopper),
    ("H100", GpuArch::Hopper),
    ("H800", GpuArch::Hopper),
    ("H20", GpuArch::Hopper),
    ("L40S", GpuArch::Ada),
    ("L40", GpuArch::Ada),
    ("L4", GpuArch::Ada),
    ("A100", GpuArch::Ampere),
    ("A800", GpuArch::Ampere),
    ("A30", GpuArch::Ampere),
];

/// The architecture of a GPU product label such as `NVIDIA-H100-80GB-HBM3`; `None` when the
/// product is not one the worker has kernels for.
pub fn arch_of(product: &str) -> Option<GpuArch> {
    let mut tokens = product.split('-');
    if tokens.next() != Some("NVIDIA") {
        return None;
    }
    let model = tokens.next()?;
    FAMILIES
        .iter()
        .find(|(family, _)| model == *family)
        .map(|&(_, arch)| arch)
}

/// Device memory in MiB as `nvidia-smi` reports it, by product family and, where a family
/// comes in several sizes, the size token of the label. Products not listed have no memory
/// plan (their label does not say enough).
const MEMORY_MIB: &[(&str, Option<&str>, u64)] = &[
    ("B200", None, 183_359),
    ("H200", None, 143_771),
    ("H100", Some("NVL"), 95_830),
    ("H100", Some("80GB"), 81_559),
    ("H800", None, 81_559),
    ("H20", None, 97_871),
    ("L40S", None, 46_068),
    ("L40", None, 46_068),
    ("L4", None, 23_034),
    ("A100", Some("40GB"), 40_960),
    ("A100", None, 81_920),
    ("A800", Some("40GB"), 40_960),
    ("A800", None, 81_920),
    ("A30", None, 24_576),
];

/// The device memory of a GPU product label, in bytes, when it is known.
pub fn memory_bytes(product: &str) -> Option<u64> {
    let mut tokens = product.split('-');
    if tokens.next() != Some("NVIDIA") {
        return None;
    }
    let model = tokens.next()?;
    let rest: Vec<&str> = tokens.collect();
    MEMORY_MIB
        .iter()
        .find(|(family, size, _)| *family == model && size.is_none_or(|size| rest.contains(&size)))
        .map(|&(_, _, mib)| mib << 20)
}

/// On a GPU, `auto` is FP8 weights (DeepSeek publishes FP8 checkpoints): every architecture
/// holds them at a byte each; Ada, Hopper and newer multiply in FP8, Ampere in bf16 on
/// weights dequantised inside the GEMM.
pub fn resolve_dtype(dtype: Dtype) -> Dtype {
    match dtype {
        Dtype::Auto => Dtype::Fp8,
        explicit => explicit,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_labels_map_to_architectures() {
        let cases = [
            ("NVIDIA-H100-80GB-HBM3", Some(GpuArch::Hopper)),
            ("NVIDIA-H200", Some(GpuArch::Hopper)),
            ("NVIDIA-H20", Some(GpuArch::Hopper)),
            ("NVIDIA-GH200-480GB", Some(GpuArch::Hopper)),
            ("NVIDIA-A100-SXM4-80GB", Some(GpuArch::Ampere)),
            ("NVIDIA-A100-PCIE-40GB", Some(GpuArch::Ampere)),
            ("NVIDIA-L40S", Some(GpuArch::Ada)),
            ("NVIDIA-B200", Some(GpuArch::Blackwell)),
            ("NVIDIA-H100-80GB-HBM3-MIG-1g.10gb", Some(GpuArch::Hopper)),
            ("NVIDIA-V100-SXM2-16GB", None),
            ("Tesla-T4", None),
            ("H100", None),
            ("", None),
        ];
        for (product, arch) in cases {
            assert_eq!(arch_of(product), arch, "{product}");
        }
    }

    #[test]
    fn memory_follows_the_family_and_the_size_the_label_names() {
        let gib = |product| memory_bytes(product).map(|b| b >> 30);
        assert_eq!(gib("NVIDIA-H100-80GB-HBM3"), Some(79));
        assert_eq!(gib("NVIDIA-H100-NVL"), Some(93));
        assert_eq!(gib("NVIDIA-H100-PCIe"), None);
        assert_eq!(gib("NVIDIA-H200"), Some(140));
        assert_eq!(gib("NVIDIA-A100-SXM4-80GB"), Some(80));
        assert_eq!(gib("NVIDIA-A100-PCIE-40GB"), Some(40));
        assert_eq!(gib("NVIDIA-GH200-480GB"), None);
        assert_eq!(gib("Tesla-T4"), None);
    }

    #[test]
    fn auto_dtype_is_fp8_weights_on_every_gpu() {
        assert_eq!(resolve_dtype(Dtype::Auto), Dtype::Fp8);
        assert_eq!(resolve_dtype(Dtype::Fp8), Dtype::Fp8);
        assert_eq!(resolve_dtype(Dtype::Bf16), Dtype::Bf16);
    }
}
