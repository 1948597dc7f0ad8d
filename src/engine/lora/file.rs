//! Reading an adapter's two files: each opened once, checked where it really lies (with
//! allowed roots) and read through that descriptor; `adapter_model.safetensors`
//! memory-mapped, each tensor copied out to the host and its values scanned (finite, largest
//! magnitude) in parallel.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::engine::lora::LoraError;

/// Largest `adapter_config.json` read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// An adapter folder's `adapter_config.json` and `adapter_model.safetensors`, open.
pub(super) struct AdapterFiles {
    config: (PathBuf, File),
    weights: (PathBuf, File),
}

impl AdapterFiles {
    /// Opens both files of `dir`, refusing a missing one, a pickle, a config over 1 MiB and
    /// weights over `weights_limit` bytes (checked on the open files, before anything is read
    /// whole). With `roots`, each file's real path at open time (after every `..` and symlink,
    /// its folder's included) must lie inside one: checking a path and opening it again later
    /// left a window for a swapped symlink, so every later read goes through these descriptors.
    pub(super) fn open(
        dir: &Path,
        roots: Option<&[PathBuf]>,
        (weights_limit, max_rank): (u64, usize),
    ) -> Result<Self, LoraError> {
        let config_path = dir.join("adapter_config.json");
        let weights_path = dir.join("adapter_model.safetensors");
        if !weights_path.is_file() && dir.join("adapter_model.bin").is_file() {
            return Err(LoraError::BinFormat(dir.join("adapter_model.bin")));
        }
        if !config_path.is_file() || !weights_path.is_file() {
            return Err(LoraError::NotFound(dir.to_path_buf()));
        }
        let config = open_within(&config_path, roots)?;
        let weights = open_within(&weights_path, roots)?;
        let config_bytes = size(&config_path, &config)?;
        if config_bytes > MAX_CONFIG_BYTES {
            return Err(LoraError::Config(format!(
                "{config_bytes} bytes; an adapter config is at most {MAX_CONFIG_BYTES}"
            )));
        }
        let weights_bytes = size(&weights_path, &weights)?;
        if weights_bytes > weights_limit {
            return Err(LoraError::ShapeMismatch(format!(
                "adapter_model.safetensors is {weights_bytes} bytes, more than any adapter of rank <= {max_rank} for this base ({weights_limit})"
            )));
        }
        Ok(Self { config: (config_path, config), weights: (weights_path, weights) })
    }

    /// The config's text.
    pub(super) fn config_text(&mut self) -> Result<String, LoraError> {
        let (path, file) = &mut self.config;
        let mut text = String::new();
        file.take(MAX_CONFIG_BYTES)
            .read_to_string(&mut text)
            .map_err(|e| LoraError::Io { path: path.clone(), source: e })?;
        Ok(text)
    }

    /// Every tensor of the weights file, see [`read_tensors`].
    pub(super) fn tensors(&self) -> Result<Vec<(String, Tensor, Option<f64>)>, LoraError> {
        read_tensors(&fd_path(&self.weights.1, &self.weights.0))
    }
}

fn size(path: &Path, file: &File) -> Result<u64, LoraError> {
    file.metadata().map(|m| m.len()).map_err(|e| LoraError::Io { path: path.into(), source: e })
}

/// Opens `path`; with `roots`, refuses it unless the file it opened lies inside one of them.
fn open_within(path: &Path, roots: Option<&[PathBuf]>) -> Result<File, LoraError> {
    let io = |e| LoraError::Io { path: path.into(), source: e };
    let file = File::open(path).map_err(io)?;
    if let Some(roots) = roots {
        let real = real_path(&file, path).map_err(io)?;
        if !roots.iter().any(|r| real.starts_with(r)) {
            return Err(LoraError::OutsideRoots { path: path.into(), real });
        }
    }
    Ok(file)
}

/// Where the open `file` really is: the kernel's name for its descriptor.
#[cfg(target_os = "linux")]
fn real_path(file: &File, path: &Path) -> std::io::Result<PathBuf> {
    std::fs::read_link(fd_path(file, path))
}

/// Where the open `file` really is. Without Linux's `/proc/self/fd`, the path resolved right
/// after the open (a window of microseconds, where Linux has none).
#[cfg(not(target_os = "linux"))]
fn real_path(_file: &File, path: &Path) -> std::io::Result<PathBuf> {
    path.canonicalize()
}

/// A path that opens `file` itself (Linux: its descriptor's `/proc/self/fd` entry, so a
/// rename or symlink swapped in since the open changes nothing), else `path`.
fn fd_path(file: &File, path: &Path) -> PathBuf {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let _ = path;
        PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        path.to_path_buf()
    }
}

/// The largest magnitude's bits of IEEE values given as bits (`exp`: the exponent mask, all ones
/// = Inf/NaN; `abs`: every bit but the sign), or `None` if one is not finite. Finite
/// magnitudes order as their bits do, so this is integer work the compiler vectorises.
fn scan_bits(bits: impl Iterator<Item = u32>, exp: u32, abs: u32) -> Option<u32> {
    let (mut max, mut special) = (0u32, false);
    for b in bits {
        special |= b & exp == exp;
        max = max.max(b & abs);
    }
    (!special).then_some(max)
}

/// Every tensor of a safetensors file as a host tensor with its value scan
/// ([`max_abs_finite`]), the file memory-mapped and its tensors copied out and scanned in
/// parallel (reading the file whole and then converting it was most of an 8B adapter's load).
fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor, Option<f64>)>, LoraError> {
    use candle_core::safetensors::Load;
    use rayon::prelude::*;
    // SAFETY: the map is read while this function runs and dropped before it returns; lab
    // writes adapters to a temporary file and renames it (never in place), so a save during a
    // load replaces the directory entry, not the mapped bytes.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(path)? };
    let names: Vec<String> = st.tensors().into_iter().map(|(name, _)| name).collect();
    names
        .into_par_iter()
        .map(|name| {
            let view = st.get(&name)?;
            let t = view.load(&Device::Cpu)?;
            let scan = max_abs_finite(&t)?;
            Ok((name, t, scan))
        })
        .collect()
}

/// The largest |value| of `t`, or `None` when some element is NaN or Inf: one pass over the
/// file's own values (a host tensor), no converted copy (converting 42 M values to f64 first
/// took most of an 8B adapter's load).
pub(super) fn max_abs_finite(t: &Tensor) -> Result<Option<f64>, LoraError> {
    fn scan<T: Copy>(v: &[T], f: impl Fn(T) -> f64) -> Option<f64> {
        v.iter().try_fold(0f64, |m, &x| {
            let x = f(x);
            x.is_finite().then(|| m.max(x.abs()))
        })
    }
    use candle_core::{CpuStorage, Storage};
    // A contiguous host tensor is scanned where it lies (no copy).
    if let Some((o, n)) = t.layout().contiguous_offsets().map(|(a, b)| (a, b - a)) {
        let (storage, _) = t.storage_and_layout();
        match &*storage {
            Storage::Cpu(CpuStorage::F32(v)) => {
                let bits = scan_bits(v[o..o + n].iter().map(|x| x.to_bits()), 0x7f80_0000, 0x7fff_ffff);
                return Ok(bits.map(|b| f64::from(f32::from_bits(b))));
            }
            Storage::Cpu(CpuStorage::BF16(v)) => {
                let bits = scan_bits(v[o..o + n].iter().map(|x| u32::from(x.to_bits())), 0x7f80, 0x7fff);
                return Ok(bits.map(|b| f64::from(half::bf16::from_bits(b as u16))));
            }
            Storage::Cpu(CpuStorage::F16(v)) => {
                let bits = scan_bits(v[o..o + n].iter().map(|x| u32::from(x.to_bits())), 0x7c00, 0x7fff);
                return Ok(bits.map(|b| f64::from(half::f16::from_bits(b as u16))));
            }
            _ => {}
        }
    }
    Ok(scan(&t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?, |x| x))
}

#[cfg(test)]
mod load_timing {
    use super::*;
    use crate::engine::lora::LoraAdapter;
    use crate::engine::model::config::LlamaConfig;

    /// Where a hot load's host half goes for the 8B shape (rank 16 on every projection, bf16
    /// file, 84 MB): `cargo test --release --lib lora::file::load_timing -- --ignored --nocapture`.
    /// A measurement aid, not a check: the figures belong in BENCHMARKS.md with `lab bench`'s.
    #[test]
    #[ignore]
    fn host_half_of_a_hot_load_of_an_8b_adapter() {
        let cfg = LlamaConfig::preset("llama-3.1-8b").unwrap();
        let dir = std::env::temp_dir().join(format!("lab-load-timing-{}", std::process::id()));
        LoraAdapter::random(&cfg, 16, 1, DType::BF16, &Device::Cpu).unwrap().save_as(&dir, DType::BF16).unwrap();
        for _ in 0..4 {
            let t = std::time::Instant::now();
            let a = LoraAdapter::load(&dir, &cfg, 16, DType::BF16, &Device::Cpu).unwrap();
            eprintln!(
                "load into host memory: {:.1} ms ({} factors)",
                t.elapsed().as_secs_f64() * 1e3,
                2 * a.weights.len()
            );
        }
        let t = std::time::Instant::now();
        let tensors = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
        eprintln!("  of which safetensors::load: {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
        let t = std::time::Instant::now();
        for t in tensors.values() {
            max_abs_finite(t).unwrap();
        }
        eprintln!("  of which the value scans (serial here): {:.1} ms", t.elapsed().as_secs_f64() * 1e3);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
