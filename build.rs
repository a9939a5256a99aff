//! With the `cuda` feature: compiles src/kernels/cuda/fused.cu to PTX with nvcc (the compiler
//! candle's own kernels need for that feature), for src/kernels/cuda/mod.rs to embed. The
//! default build does nothing here.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/kernels/cuda/fused.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("fused.ptx");
    let nvcc = std::env::var("NVCC").ok().unwrap_or_else(|| {
        ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"]
            .iter()
            .filter_map(|v| std::env::var(v).ok())
            .map(|h| format!("{h}/bin/nvcc"))
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or_else(|| "nvcc".into())
    });
    // PTX for the virtual architecture of the GPU named (as candle-kernels reads it), JIT-compiled
    // by the driver at load; nothing in these kernels needs more than compute_75.
    let cap: u32 = std::env::var("CUDA_COMPUTE_CAP")
        .ok()
        .and_then(|c| c.trim_end_matches(['a', 'f']).parse().ok())
        .unwrap_or(75);
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("src/kernels/cuda/fused.cu")
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {nvcc} (needed by the cuda feature): {e}"));
    assert!(
        status.success(),
        "{nvcc} failed on src/kernels/cuda/fused.cu"
    );
}
