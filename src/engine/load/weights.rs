//! Model weights from any source -> a [`VarBuilder`] of Hugging Face-named tensors.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::engine::load::gguf::GgufFile;
use crate::engine::load::source::ModelFiles;
use crate::engine::model::config::LlamaConfig;
use crate::engine::{EngineError, Result};

/// Every weight of a Llama with `cfg`'s shape: HF name and `[out, in]`-style shape.
///
/// The synthetic builder creates exactly these tensors, so the parameter count printed for a
/// synthetic model is the count of what was built.
pub fn expected_shapes(cfg: &LlamaConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, q, kv) = (cfg.hidden_size, cfg.intermediate_size, cfg.q_dim(), cfg.kv_dim());
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![cfg.vocab_size, h])];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        v.push((format!("{p}.input_layernorm.weight"), vec![h]));
        v.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
        v.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
        v.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
        v.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        v.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
        v.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
        v.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
    }
    v.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        v.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
    }
    v
}

/// Number of parameters (tied embeddings counted once).
pub fn param_count(cfg: &LlamaConfig) -> u64 {
    expected_shapes(cfg).iter().map(|(_, s)| s.iter().product::<usize>() as u64).sum()
}

/// Seeded random weights of `cfg`'s exact shapes: norms 1, matrices U(-a, a) with std 0.02.
///
/// Element `i` of tensor `t` is a pure function of `(seed, t, i)` (a counter-based stream), so
/// the values depend on neither the device, the thread count nor the chunking, and chunks of a
/// tensor can be drawn on every core at once (8 B values for `llama-3.1-8b`). Matrices are
/// written straight in the run dtype, so no f32 copy of a bf16/f16 tensor is ever built.
pub fn synthetic_tensors(
    cfg: &LlamaConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let a = 0.02f32 * 3f32.sqrt();
    let mut out = HashMap::new();
    // bf16/f16 bits are drawn into one host buffer reused by every tensor: the embedding comes
    // first and is the largest, so its pages are faulted in once rather than per tensor.
    let mut staging: Vec<u16> = Vec::new();
    for (idx, (name, shape)) in expected_shapes(cfg).into_iter().enumerate() {
        let t = if shape.len() == 1 {
            Tensor::ones(shape, dtype, device)?
        } else {
            let key = splitmix64(splitmix64(seed) ^ idx as u64);
            uniform_tensor(key, a, &shape, dtype, device, &mut staging)?
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// Elements per parallel work item; values do not depend on it, it only tunes scheduling.
const SYNTHETIC_CHUNK: usize = 1 << 16;

/// One U(-a, a) tensor of stream `key`, drawn on the host in `dtype` and uploaded once.
fn uniform_tensor(
    key: u64,
    a: f32,
    shape: &[usize],
    dtype: DType,
    device: &Device,
    staging: &mut Vec<u16>,
) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    Ok(match dtype {
        // lab has no bf16/f16 type (candle does not re-export `half`), so their bits are drawn
        // as u16 and handed over as raw bytes: CUDA uploads them straight from the staging
        // buffer, the CPU takes one copy.
        DType::BF16 | DType::F16 => {
            if staging.len() < n {
                // vec! of zeros is lazily zeroed memory (resize would memset it on one thread).
                *staging = vec![0u16; n];
            }
            let bits = &mut staging[..n];
            if dtype == DType::BF16 {
                fill(bits, key, a, bf16_bits)
            } else {
                fill(bits, key, a, f16_bits)
            }
            // SAFETY: u16 has no padding and u8 no alignment, so the bytes of `bits` are a valid
            // &[u8] of twice its length, borrowed only while `bits` is.
            let bytes = unsafe { std::slice::from_raw_parts(bits.as_ptr().cast::<u8>(), n * 2) };
            Tensor::from_raw_buffer(bytes, dtype, shape, device)?
        }
        other => {
            let mut v = vec![0f32; n];
            fill(&mut v, key, a, |x| x);
            let t = Tensor::from_vec(v, shape, &Device::Cpu)?;
            if other == DType::F32 { t } else { t.to_dtype(other)? }.to_device(device)?
        }
    })
}

/// Writes `conv(U(-a, a))` of stream `key` into `out`, element `i` of `out` being stream
/// element `i`, in parallel chunks.
fn fill<T: Send>(out: &mut [T], key: u64, a: f32, conv: impl Fn(f32) -> T + Sync) {
    use rayon::prelude::*;
    out.par_chunks_mut(SYNTHETIC_CHUNK).enumerate().for_each(|(c, chunk)| {
        let base = (c * SYNTHETIC_CHUNK) as u64;
        for (j, slot) in chunk.iter_mut().enumerate() {
            *slot = conv(uniform(key, base + j as u64, a));
        }
    });
}

/// Element `i` of stream `key`: SplitMix64's `i`-th output, as U(-a, a) from its top 24 bits.
#[inline]
fn uniform(key: u64, i: u64, a: f32) -> f32 {
    let h = splitmix64(key.wrapping_add(i.wrapping_mul(SPLITMIX_GAMMA)));
    // k / 2^24 is exact in f32, and so is 2u - 1; only the final scaling by `a` rounds.
    let u = (h >> 40) as f32 * (1.0 / (1u32 << 24) as f32);
    (2.0 * u - 1.0) * a
}

const SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's step: a bijective 64-bit mix, statistically strong on consecutive inputs.
#[inline]
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(SPLITMIX_GAMMA);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// f32 -> bf16 bits, round to nearest even (as `half::bf16::from_f32` for non-NaN values).
#[inline]
fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// f32 -> IEEE f16 bits, round to nearest even, subnormals and overflow to infinity included.
#[inline]
fn f16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let abs = b & 0x7FFF_FFFF;
    if abs > 0x7F80_0000 {
        return sign | 0x7E00;
    }
    let exp = (abs >> 23) as i32 - 127 + 15;
    let man = abs & 0x7F_FFFF;
    // Rounds `m >> shift` to nearest even; a carry out of the mantissa bumps the exponent,
    // which is exactly the right answer (up to infinity) in this bit layout.
    let round = |m: u32, shift: u32| -> u32 {
        let half = 1u32 << (shift - 1);
        let rem = m & ((1u32 << shift) - 1);
        let r = m >> shift;
        r + u32::from(rem > half || (rem == half && r & 1 == 1))
    };
    if exp >= 31 {
        sign | 0x7C00
    } else if exp >= 1 {
        sign | round(((exp as u32) << 23) | man, 13) as u16
    } else if exp >= -10 {
        sign | round(man | 0x80_0000, (14 - exp) as u32) as u16
    } else {
        sign
    }
}

/// The model config and a VarBuilder over its weights, for any resolved source.
pub fn open(files: &ModelFiles, dtype: DType, device: &Device) -> Result<(LlamaConfig, VarBuilder<'static>)> {
    match files {
        ModelFiles::Safetensors { config, weights, .. } => {
            let text = std::fs::read_to_string(config).map_err(|e| EngineError::io(config, e))?;
            let cfg = LlamaConfig::from_hf_json(&text)?;
            for w in weights {
                check_safetensors_header(w)?;
            }
            // SAFETY: the files are mmapped read-only; lab never writes model files while running.
            let vb = unsafe { VarBuilder::from_mmaped_safetensors(weights, dtype, device)? };
            Ok((cfg, vb))
        }
        ModelFiles::Gguf { path, .. } => {
            let gguf = GgufFile::open(path)?;
            let cfg = gguf.config()?;
            let tensors = gguf.hf_tensors(&cfg, dtype, device)?;
            Ok((cfg, VarBuilder::from_tensors(tensors, dtype, device)))
        }
        ModelFiles::Synthetic { preset, .. } => {
            let cfg = LlamaConfig::preset(preset).ok_or_else(|| EngineError::UnknownSynthetic(preset.clone()))?;
            let tensors = synthetic_tensors(&cfg, 0, dtype, device)?;
            Ok((cfg, VarBuilder::from_tensors(tensors, dtype, device)))
        }
    }
}

/// Fails early, with the file name, on a file that is not safetensors.
fn check_safetensors_header(path: &std::path::Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| EngineError::io(path, e))?;
    let n = u64::from_le_bytes(len);
    if n == 0 || n > 100_000_000 {
        return Err(EngineError::UnknownFormat(format!("{}: not a safetensors file", path.display())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_31_8b_has_its_published_parameter_count() {
        let cfg = LlamaConfig::preset("llama-3.1-8b").unwrap();
        assert_eq!(param_count(&cfg), 8_030_261_248);
        let smol = LlamaConfig::preset("smollm2-135m").unwrap();
        assert_eq!(param_count(&smol), 134_515_008);
    }

    #[test]
    fn synthetic_builds_exactly_the_expected_shapes() {
        let cfg = LlamaConfig::preset("tiny").unwrap();
        let t = synthetic_tensors(&cfg, 7, DType::F32, &Device::Cpu).unwrap();
        let built: u64 = t.values().map(|t| t.elem_count() as u64).sum();
        assert_eq!(built, param_count(&cfg));
        let again = synthetic_tensors(&cfg, 7, DType::F32, &Device::Cpu).unwrap();
        let name = "model.layers.1.mlp.up_proj.weight";
        let diff = (&t[name] - &again[name]).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0, "same seed, same weights");
        let other = synthetic_tensors(&cfg, 8, DType::F32, &Device::Cpu).unwrap();
        let diff = (&t[name] - &other[name]).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff > 0.0, "another seed, other weights");
    }

    #[test]
    fn synthetic_values_are_uniform_with_std_002() {
        let cfg = LlamaConfig::preset("tiny").unwrap();
        let t = synthetic_tensors(&cfg, 0, DType::F32, &Device::Cpu).unwrap();
        let a = 0.02f32 * 3f32.sqrt();
        let v = t["model.embed_tokens.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| (-a..=a).contains(x)));
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        assert!(mean.abs() < 1e-4 && (std - 0.02).abs() < 1e-4, "mean {mean}, std {std}");
        let norm = t["model.norm.weight"].to_vec1::<f32>().unwrap();
        assert!(norm.iter().all(|&x| x == 1.0));
        // Tensors draw from distinct streams.
        let q = t["model.layers.0.self_attn.q_proj.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let k = t["model.layers.0.self_attn.k_proj.weight"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_ne!(q[..16], k[..16]);
    }

    #[test]
    fn half_dtypes_are_the_f32_values_rounded() {
        // The bf16/f16 paths write bits directly; they must equal candle's own conversion of
        // the f32 path, so a model's values do not depend on the dtype beyond rounding.
        let cfg = LlamaConfig::preset("tiny").unwrap();
        let f32s = synthetic_tensors(&cfg, 3, DType::F32, &Device::Cpu).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let half = synthetic_tensors(&cfg, 3, dtype, &Device::Cpu).unwrap();
            for (name, t) in &f32s {
                let want = t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                let got = half[name].to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                assert_eq!(half[name].dtype(), dtype);
                assert_eq!(got.to_vec1::<f32>().unwrap(), want.to_vec1::<f32>().unwrap(), "{name} {dtype:?}");
            }
        }
    }

    #[test]
    fn bit_conversions_match_candle_on_every_range() {
        // Random bit patterns cover normals, subnormals, ties, overflow and the signs.
        let mut xs: Vec<f32> =
            (0..200_000u64).map(|i| f32::from_bits((splitmix64(i) >> 32) as u32)).filter(|x| !x.is_nan()).collect();
        xs.extend([0.0, -0.0, 65504.0, 65520.0, 1e-8, -6.1e-5, 5.96e-8, 2.98e-8, f32::INFINITY, f32::NEG_INFINITY]);
        let t = Tensor::from_vec(xs.clone(), xs.len(), &Device::Cpu).unwrap();
        for (dtype, conv) in [(DType::BF16, bf16_bits as fn(f32) -> u16), (DType::F16, f16_bits)] {
            let bits: Vec<u16> = xs.iter().map(|&x| conv(x)).collect();
            let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
            let ours = Tensor::from_raw_buffer(&bytes, dtype, &[xs.len()], &Device::Cpu).unwrap();
            let ours = ours.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            let theirs = t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            for ((x, o), w) in xs.iter().zip(&ours).zip(&theirs) {
                assert_eq!(o.to_bits(), w.to_bits(), "{dtype:?} of {x:e}: ours {o:e}, candle {w:e}");
            }
        }
    }
}
