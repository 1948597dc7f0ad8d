//! Model weights from any source -> a [`VarBuilder`] of Hugging Face-named tensors.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};

use super::config::LlamaConfig;
use super::gguf::GgufFile;
use super::source::ModelFiles;
use super::{EngineError, Result};

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
/// Each tensor has its own stream (seed + index), so the values do not depend on the device.
pub fn synthetic_tensors(
    cfg: &LlamaConfig,
    seed: u64,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let a = 0.02f32 * 3f32.sqrt();
    let mut out = HashMap::new();
    for (idx, (name, shape)) in expected_shapes(cfg).into_iter().enumerate() {
        let t = if shape.len() == 1 {
            Tensor::ones(shape, dtype, device)?
        } else {
            let n: usize = shape.iter().product();
            let mut rng = rand::rngs::SmallRng::seed_from_u64(seed.wrapping_add(idx as u64));
            let data: Vec<f32> = (0..n).map(|_| rng.gen_range(-a..a)).collect();
            Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?
        };
        out.insert(name, t);
    }
    Ok(out)
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
    }
}
