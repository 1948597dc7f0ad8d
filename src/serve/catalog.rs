//! The names the server answers to: the base model and the registered adapters (what
//! `/v1/models` lists and validation resolves `model` against), and where runtime loads may
//! read adapters from.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use super::error::ApiError;
use super::validation::unix_now;

/// One registered adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogEntry {
    pub path: PathBuf,
    /// Unix seconds when it was (re)loaded.
    pub created: u64,
    /// Why its last load failed, until one succeeds (`/v1/models` does not list it meanwhile).
    pub failed: Option<String>,
}

/// Base name + adapters, shared by the HTTP handlers (the engine keeps its own registry).
#[derive(Debug)]
pub struct Catalog {
    base: String,
    adapters: RwLock<BTreeMap<String, CatalogEntry>>,
}

impl Catalog {
    pub fn new(base: String) -> Self {
        Self { base, adapters: RwLock::new(BTreeMap::new()) }
    }

    /// The served name of the base model (`--served-model-name`).
    pub fn base_name(&self) -> &str {
        &self.base
    }

    pub fn contains(&self, name: &str) -> bool {
        self.read().contains_key(name)
    }

    /// Adds or replaces `name`.
    pub fn insert(&self, name: &str, path: &Path) {
        let entry = CatalogEntry { path: path.to_path_buf(), created: unix_now(), failed: None };
        self.adapters.write().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), entry);
    }

    /// Records the outcome of a load of `name` (`Some(why)` failed, `None` succeeded).
    pub fn set_failed(&self, name: &str, why: Option<String>) {
        if let Some(e) = self.adapters.write().unwrap_or_else(|p| p.into_inner()).get_mut(name) {
            e.failed = why;
        }
    }

    pub fn remove(&self, name: &str) -> bool {
        self.adapters.write().unwrap_or_else(|p| p.into_inner()).remove(name).is_some()
    }

    /// Every adapter, by name.
    pub fn adapters(&self) -> BTreeMap<String, CatalogEntry> {
        self.read().clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, CatalogEntry>> {
        self.adapters.read().unwrap_or_else(|p| p.into_inner())
    }
}

/// The files an adapter load reads from its folder.
const ADAPTER_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];

/// Why `name` cannot name an adapter, if it cannot: 1-128 characters of `[A-Za-z0-9._:/-]`
/// (a comma or quote would corrupt `vllm:lora_requests_info`'s label list, and Prometheus
/// label values, logs and URLs all stay plain).
pub fn invalid_adapter_name(name: &str) -> Option<String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "._:/-".contains(c);
    if name.is_empty() || name.len() > 128 || !name.chars().all(ok) {
        return Some(format!(
            "invalid adapter name `{}`: use 1-128 characters of A-Z a-z 0-9 . _ : / -",
            name.chars().take(140).collect::<String>()
        ));
    }
    None
}

/// Roots that runtime loads may read from (`--lora-dir`, `--allowed-lora-dirs`), canonical.
#[derive(Debug, Clone, Default)]
pub struct AllowedRoots(Vec<PathBuf>);

impl AllowedRoots {
    /// Canonicalizes each root (they must exist).
    pub fn new(roots: &[PathBuf]) -> std::io::Result<Self> {
        roots.iter().map(|r| r.canonicalize()).collect::<std::io::Result<Vec<_>>>().map(Self)
    }

    /// The roots a load of the adapter registered at `dir` is confined to: all of them when
    /// `dir` lies inside one as written (runtime loads register the canonical path
    /// [`AllowedRoots::check`] returned, `--lora-dir` folders their root's canonical path
    /// joined with their name), else none (a `--lora-modules` path elsewhere is the
    /// operator's). Decided on the registered path, never on where it resolves at read time.
    pub fn confining(&self, dir: &Path) -> Option<&[PathBuf]> {
        self.0.iter().any(|r| dir.starts_with(r)).then_some(self.0.as_slice())
    }

    /// The canonical form of `path` if it lies inside a root after `..` and symlinks are
    /// resolved; otherwise a 400 that says why.
    pub fn check(&self, path: &str) -> Result<PathBuf, ApiError> {
        if self.0.is_empty() {
            return Err(ApiError::bad(
                "lora_path",
                "runtime loads need an allowed root: start the server with --lora-dir DIR or --allowed-lora-dirs DIR",
            ));
        }
        let real = Path::new(path)
            .canonicalize()
            .map_err(|e| ApiError::bad("lora_path", format!("cannot open lora_path {path}: {e}")))?;
        if self.0.iter().any(|root| real.starts_with(root)) {
            // The folder is inside a root; each file read from it must be too (a symlinked
            // adapter_model.safetensors would otherwise read anything the server can).
            for file in ADAPTER_FILES {
                let Ok(f) = real.join(file).canonicalize() else { continue };
                if !self.0.iter().any(|root| f.starts_with(root)) {
                    return Err(ApiError::bad(
                        "lora_path",
                        format!("{file} in lora_path {path} resolves to {}, outside the allowed roots", f.display()),
                    ));
                }
            }
            Ok(real)
        } else {
            Err(ApiError::bad(
                "lora_path",
                format!(
                    "lora_path {path} resolves to {} which is outside the allowed roots ({})",
                    real.display(),
                    self.0.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", ")
                ),
            ))
        }
    }
}
