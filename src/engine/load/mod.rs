//! One call from a `--model` value to a ready model + tokenizer.

pub mod gguf;
pub mod hub;
pub mod source;
pub mod weights;

use std::path::Path;

use candle_core::{DType, Device};

use crate::engine::load::gguf::GgufFile;
use crate::engine::load::source::{resolve, ModelFiles, ModelSource, DEFAULT_MODEL_NAME};
use crate::engine::model::Llama;
use crate::engine::text::tokenizer::Tokenizer;
use crate::engine::Result;

/// A model ready to run, with the tokenizer that belongs to it.
pub struct LoadedModel {
    /// What to report (`synthetic:NAME` for random weights).
    pub name: String,
    /// True for `synthetic:` models: their outputs are meaningless, only their speed is real.
    pub synthetic: bool,
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// Where the tokenizer came from, for the start-up line (a synthetic model without a
    /// cached default model runs on the built-in byte-level tokenizer, and should say so).
    pub tokenizer_label: String,
    pub files: ModelFiles,
}

/// [`LoadedModel::tokenizer_label`] of a synthetic model on the built-in byte-level tokenizer.
pub const BYTE_LEVEL_LABEL: &str = "built-in byte-level (no default model cached)";

/// Resolves `source` (fetching if needed) and loads weights in `dtype` on `device`.
pub fn load_model(source: &ModelSource, home: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let files = resolve(source, home)?;
    let (cfg, vb) = crate::engine::load::weights::open(&files, dtype, device)?;
    let model = Llama::load(vb, &cfg)?;
    // Every paged CUDA forward takes the fused layer (engine::model::fused); `vb` is gone by
    // now, so the separate weights are freed as their concatenations replace them.
    let model = if device.is_cuda() { model.with_fused_projections()? } else { model };
    let (tokenizer, tokenizer_label) = match &files {
        ModelFiles::Safetensors { tokenizer, tokenizer_config, .. } => (
            Tokenizer::from_hf_files(tokenizer, tokenizer_config.as_deref(), &cfg.eos_token_ids)?,
            "tokenizer.json".to_string(),
        ),
        ModelFiles::Gguf { path, .. } => (Tokenizer::from_gguf(&GgufFile::open(path)?)?, "GGUF metadata".to_string()),
        ModelFiles::Synthetic { tokenizer_from: Some(path), .. } => {
            (Tokenizer::from_gguf(&GgufFile::open(path)?)?, format!("default model's ({DEFAULT_MODEL_NAME})"))
        }
        ModelFiles::Synthetic { tokenizer_from: None, .. } => (Tokenizer::byte_level()?, BYTE_LEVEL_LABEL.to_string()),
    };
    Ok(LoadedModel {
        name: files.name(),
        synthetic: matches!(files, ModelFiles::Synthetic { .. }),
        model,
        tokenizer,
        tokenizer_label,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_without_a_cached_default_loads_the_byte_level_tokenizer() {
        let home = crate::engine::load::source::tests::empty_home("loader-home");
        let m = load_model(&ModelSource::Synthetic("tiny".into()), &home, DType::F32, &Device::Cpu).unwrap();
        assert!(m.synthetic);
        assert_eq!(m.tokenizer_label, BYTE_LEVEL_LABEL);
        assert_eq!(m.tokenizer.vocab_size(), 259);
        assert_eq!(m.tokenizer.eos_ids(), &[256, 258]);
        assert!(!home.join("models").exists(), "nothing was fetched");
        std::fs::remove_dir_all(&home).unwrap();
    }
}
