//! Checkpoints that are never half-written: each is a directory written under a temporary name
//! and renamed into place; `latest` (itself replaced by rename) names the newest complete one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::engine::lora::LoraAdapter;

use super::TrainError;

/// What a run needs besides weights and moments to continue exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    pub total_steps: usize,
    /// Settings that must not change across a resume (see `TrainSettings::fingerprint`).
    pub fingerprint: String,
}

fn io(path: &Path, e: std::io::Error) -> TrainError {
    TrainError::Io { path: path.to_path_buf(), source: e }
}

/// Writes checkpoint `state.step` under `out/checkpoints/`, keeping the newest `keep`.
pub fn save(
    out: &Path,
    adapter: &LoraAdapter,
    optimizer: HashMap<String, Tensor>,
    state: &TrainerState,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let root = out.join("checkpoints");
    let name = format!("step-{:07}", state.step);
    let tmp = root.join(format!(".tmp-{name}"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    adapter.save(&tmp)?;
    candle_core::safetensors::save(&optimizer, tmp.join("optimizer.safetensors"))?;
    let json = serde_json::to_string_pretty(state).expect("state serializes");
    std::fs::write(tmp.join("trainer_state.json"), json).map_err(|e| io(&tmp, e))?;
    let dest = root.join(&name);
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::rename(&tmp, &dest).map_err(|e| io(&dest, e))?;
    let latest_tmp = root.join(".latest.tmp");
    std::fs::write(&latest_tmp, &name).map_err(|e| io(&latest_tmp, e))?;
    std::fs::rename(&latest_tmp, root.join("latest")).map_err(|e| io(&root, e))?;
    prune(&root, keep);
    Ok(dest)
}

/// Removes all but the newest `keep` complete checkpoints (and what a kill left of earlier
/// removals). Each old checkpoint is first renamed out of the `step-*` names, then deleted, so
/// a kill during the deletion never leaves a half-deleted `step-*` folder behind.
fn prune(root: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    let mut names: Vec<String> =
        entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    let done: Vec<&String> = names.iter().filter(|n| n.starts_with("step-")).collect();
    for n in done.iter().take(done.len().saturating_sub(keep)) {
        let trash = root.join(format!(".trash-{n}"));
        if std::fs::rename(root.join(n), &trash).is_ok() {
            let _ = std::fs::remove_dir_all(&trash);
        }
    }
    for n in names.iter().filter(|n| n.starts_with(".trash-")) {
        let _ = std::fs::remove_dir_all(root.join(n));
    }
}

/// The newest complete checkpoint: adapter, optimizer moments, trainer state.
pub fn load_latest(
    out: &Path,
    device: &Device,
) -> Result<Option<(PathBuf, HashMap<String, Tensor>, TrainerState)>, TrainError> {
    let root = out.join("checkpoints");
    let Ok(name) = std::fs::read_to_string(root.join("latest")) else { return Ok(None) };
    let dir = root.join(name.trim());
    let text = std::fs::read_to_string(dir.join("trainer_state.json")).map_err(|e| io(&dir, e))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| TrainError::Data(format!("{}: {e}", dir.display())))?;
    let moments = candle_core::safetensors::load(dir.join("optimizer.safetensors"), device)?;
    Ok(Some((dir, moments, state)))
}
