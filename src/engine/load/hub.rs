//! Hugging Face Hub repo ids through `hf-hub`: the local cache first, the network only if needed.

use std::path::PathBuf;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::engine::load::source::{local_dir_files, ModelFiles};
use crate::engine::{EngineError, Result};

const FILES: [&str; 2] = ["config.json", "tokenizer.json"];
const OPTIONAL: [&str; 2] = ["tokenizer_config.json", "model.safetensors.index.json"];

/// Downloads (or finds in the hf-hub cache) a repo's config, tokenizer and safetensors weights.
pub fn fetch(repo_id: &str, revision: Option<&str>) -> Result<ModelFiles> {
    let repo = match revision {
        Some(rev) => Repo::with_revision(repo_id.to_string(), RepoType::Model, rev.to_string()),
        None => Repo::new(repo_id.to_string(), RepoType::Model),
    };
    let unavailable = |reason: String| EngineError::HubUnavailable { repo: repo_id.to_string(), reason };
    if let Some(dir) = cached_snapshot(&repo) {
        return local_dir_files(&dir, repo_id);
    }
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1") {
        return Err(unavailable("HF_HUB_OFFLINE=1 and the repo is not in the cache".into()));
    }
    let api = ApiBuilder::from_env().with_progress(true).build().map_err(|e| unavailable(e.to_string()))?;
    let api_repo = api.repo(repo);
    let mut dir: Option<PathBuf> = None;
    for f in FILES {
        let p = api_repo.get(f).map_err(|e| unavailable(e.to_string()))?;
        dir = p.parent().map(PathBuf::from);
    }
    for f in OPTIONAL {
        let _ = api_repo.get(f);
    }
    let dir = dir.expect("FILES is not empty");
    let index = dir.join("model.safetensors.index.json");
    let shards: Vec<String> = if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| EngineError::io(&index, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| EngineError::Weights(e.to_string()))?;
        let mut s: Vec<String> = v["weight_map"]
            .as_object()
            .map(|m| m.values().filter_map(|x| x.as_str().map(String::from)).collect())
            .unwrap_or_default();
        s.sort();
        s.dedup();
        s
    } else {
        vec!["model.safetensors".to_string()]
    };
    for s in shards {
        api_repo.get(&s).map_err(|e| unavailable(e.to_string()))?;
    }
    local_dir_files(&dir, repo_id)
}

/// The snapshot folder if config, tokenizer and weights are all cached already.
fn cached_snapshot(repo: &Repo) -> Option<PathBuf> {
    let cache = Cache::from_env().repo(repo.clone());
    let config = cache.get("config.json")?;
    cache.get("tokenizer.json")?;
    let dir = config.parent()?.to_path_buf();
    let has_weights = dir.join("model.safetensors.index.json").is_file() || dir.join("model.safetensors").is_file();
    has_weights.then_some(dir)
}
