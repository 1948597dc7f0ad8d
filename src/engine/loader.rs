//! One call from a `--model` value to a ready model + tokenizer.

use std::path::Path;

use candle_core::{DType, Device};

use super::gguf::GgufFile;
use super::model::Llama;
use super::source::{resolve, ModelFiles, ModelSource};
use super::tokenizer::Tokenizer;
use super::Result;

/// A model ready to run, with the tokenizer that belongs to it.
pub struct LoadedModel {
    /// What to report (`synthetic:NAME` for random weights).
    pub name: String,
    /// True for `synthetic:` models: their outputs are meaningless, only their speed is real.
    pub synthetic: bool,
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub files: ModelFiles,
}

/// Resolves `source` (fetching if needed) and loads weights in `dtype` on `device`.
pub fn load_model(source: &ModelSource, home: &Path, dtype: DType, device: &Device) -> Result<LoadedModel> {
    let files = resolve(source, home)?;
    let (cfg, vb) = super::weights::open(&files, dtype, device)?;
    let model = Llama::load(vb, &cfg)?;
    let tokenizer = match &files {
        ModelFiles::Safetensors { tokenizer, tokenizer_config, .. } => {
            Tokenizer::from_hf_files(tokenizer, tokenizer_config.as_deref(), &cfg.eos_token_ids)?
        }
        ModelFiles::Gguf { path, .. } => Tokenizer::from_gguf(&GgufFile::open(path)?)?,
        ModelFiles::Synthetic { tokenizer_from, .. } => Tokenizer::from_gguf(&GgufFile::open(tokenizer_from)?)?,
    };
    Ok(LoadedModel {
        name: files.name(),
        synthetic: matches!(files, ModelFiles::Synthetic { .. }),
        model,
        tokenizer,
        files,
    })
}
