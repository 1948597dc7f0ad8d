//! Compiles `kernels/*.cu` to PTX for `--features cuda` (nothing otherwise: the default build
//! and the CPU tests never need CUDA).
//!
//! Plain `-arch=sm_90`: the GPU machine's driver is CUDA 13.0 and JIT-compiles this PTX at first
//! use; keep nvcc at 13.0.x (a newer nvcc writes PTX that driver rejects).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=LAB_CUDA_ARCH");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let arch = std::env::var("LAB_CUDA_ARCH").unwrap_or_else(|_| "sm_90".into());
    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("kernels/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    sources.sort();
    for src in sources {
        let ptx = out.join(src.with_extension("ptx").file_name().expect("a file name"));
        let status = Command::new(&nvcc)
            .args([&format!("-arch={arch}"), "-O3", "--use_fast_math", "-std=c++17", "--ptx"])
            .arg(&src)
            .arg("-o")
            .arg(&ptx)
            .status()
            .unwrap_or_else(|e| {
                panic!("could not run {nvcc} (is the CUDA toolchain on PATH? see bench/setup-cuda-toolchain.sh): {e}")
            });
        assert!(status.success(), "{nvcc} failed on {}", src.display());
    }
}
