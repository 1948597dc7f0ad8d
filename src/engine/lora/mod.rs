//! PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors` <-> [`LoraAdapter`].
//!
//! The PEFT format is the contract between `train-lora` and `serve` (and vLLM/PEFT). Keys are
//! `base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_{A,B}.weight` and
//! `...mlp.{gate,up,down}_proj...`; `A: [r, in]`, `B: [out, r]`; the update is
//! `W' = W + s * B A` with `s = alpha / r` (or `alpha / sqrt(r)` with `use_rslora`).

mod file;
pub mod op;
pub mod registry;
pub mod slots;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::engine::model::config::LlamaConfig;

/// The seven projections a LoRA may target, in PEFT's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraModule {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraModule {
    pub const ALL: [LoraModule; 7] = [
        LoraModule::Q,
        LoraModule::K,
        LoraModule::V,
        LoraModule::O,
        LoraModule::Gate,
        LoraModule::Up,
        LoraModule::Down,
    ];

    /// PEFT/HF module name (`q_proj`, ...).
    pub fn name(self) -> &'static str {
        match self {
            LoraModule::Q => "q_proj",
            LoraModule::K => "k_proj",
            LoraModule::V => "v_proj",
            LoraModule::O => "o_proj",
            LoraModule::Gate => "gate_proj",
            LoraModule::Up => "up_proj",
            LoraModule::Down => "down_proj",
        }
    }

    /// `self_attn` or `mlp`.
    pub fn parent(self) -> &'static str {
        match self {
            LoraModule::Q | LoraModule::K | LoraModule::V | LoraModule::O => "self_attn",
            _ => "mlp",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// `(in, out)` of this projection in a model of shape `cfg`.
    pub fn dims(self, cfg: &LlamaConfig) -> (usize, usize) {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        match self {
            LoraModule::Q => (h, cfg.q_dim()),
            LoraModule::K | LoraModule::V => (h, cfg.kv_dim()),
            LoraModule::O => (cfg.q_dim(), h),
            LoraModule::Gate | LoraModule::Up => (h, i),
            LoraModule::Down => (i, h),
        }
    }
}

/// One projection of one layer: where a LoRA pair applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProjKey {
    pub layer: usize,
    pub module: LoraModule,
}

impl ProjKey {
    /// PEFT tensor key prefix, e.g. `base_model.model.model.layers.3.self_attn.q_proj`.
    pub fn peft_prefix(self) -> String {
        format!("base_model.model.model.layers.{}.{}.{}", self.layer, self.module.parent(), self.module.name())
    }
}

/// Why an adapter was refused; each message names the cause.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error("adapter not found: {0} (expected a directory with adapter_config.json and adapter_model.safetensors)")]
    NotFound(PathBuf),
    #[error("{0}: adapter_model.bin (pickle) is not supported; convert it to adapter_model.safetensors (PEFT: save_pretrained(..., safe_serialization=True))")]
    BinFormat(PathBuf),
    #[error("adapter_config.json: {0}")]
    Config(String),
    #[error("unsupported adapter: {0}")]
    Unsupported(String),
    #[error("adapter rank {rank} exceeds --max-lora-rank {max}")]
    RankTooLarge { rank: usize, max: usize },
    #[error("adapter does not fit the base model: {0}")]
    ShapeMismatch(String),
    #[error("adapter weight {0} contains NaN or Inf")]
    NonFinite(String),
    #[error(
        "adapter weight {name} has a value of magnitude {max:e}, above the bound {bound:e} on LoRA factors (PEFT adapters stay below about 10)",
        bound = MAX_LORA_WEIGHT
    )]
    WeightTooLarge { name: String, max: f64 },
    #[error("{path} resolves to {real}, outside the allowed roots")]
    OutsideRoots { path: PathBuf, real: PathBuf },
    #[error("io error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Largest `adapter_model.safetensors` an adapter of rank `max_rank` on every projection of
/// `cfg` can be: f64 factors (the widest dtype a PEFT file may hold) plus 1 MiB of header.
fn max_weights_bytes(cfg: &LlamaConfig, max_rank: usize) -> u64 {
    let per_layer: usize = LoraModule::ALL.iter().map(|m| m.dims(cfg)).map(|(i, o)| max_rank * (i + o)).sum();
    (per_layer * cfg.num_hidden_layers * 8) as u64 + (1 << 20)
}

/// Largest |LoRA scale| accepted at load.
pub const MAX_LORA_SCALE: f64 = 1000.0;

/// Largest |value| of a LoRA factor (A or B) accepted at load, whatever the run dtype: an
/// element of `scale * B A` is then at most `MAX_LORA_SCALE * r * MAX_LORA_WEIGHT^2`, about
/// 1e14 * r, far inside f32 and bf16 (whose checks on finiteness alone let 1e30 through and
/// NaN out of the first forward). It bounds the factors, not the activations they meet: an
/// adapter within it can still overflow at run time, which fails that request alone.
pub const MAX_LORA_WEIGHT: f64 = 1e4;

/// `adapter_config.json` (the fields that change the math, plus what refusals need).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub target_modules: TargetModules,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    #[serde(default)]
    pub task_type: Option<String>,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub bias: Option<String>,
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    pub lora_dropout: f64,
    /// PEFT's LoRA-B bias (not supported).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lora_bias: bool,
    /// PEFT's trainable token embeddings (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trainable_token_indices: Option<serde_json::Value>,
    /// PEFT's LoRA on raw parameters, e.g. MoE experts (not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_parameters: Option<serde_json::Value>,
}

/// PEFT's `target_modules`: a list of names, or one string (a name or `all-linear`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    List(Vec<String>),
    One(String),
}

impl AdapterConfig {
    /// A plain LoRA config for `modules` (what `lab train-lora` writes).
    pub fn new(r: usize, lora_alpha: f64, modules: &[LoraModule], use_rslora: bool, base: &str) -> Self {
        Self {
            peft_type: "LORA".into(),
            r,
            lora_alpha,
            target_modules: TargetModules::List(modules.iter().map(|m| m.name().to_string()).collect()),
            use_rslora,
            use_dora: false,
            modules_to_save: None,
            base_model_name_or_path: Some(base.to_string()),
            task_type: Some("CAUSAL_LM".into()),
            fan_in_fan_out: false,
            bias: Some("none".into()),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            lora_dropout: 0.0,
            lora_bias: false,
            trainable_token_indices: None,
            target_parameters: None,
        }
    }

    /// The LoRA scale `s` in `W + s * B A`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Refuses a rank or scale whose arithmetic cannot be served: `r = 0` divides by zero, and
    /// a scale beyond [`MAX_LORA_SCALE`] overflows the run dtype (NaN logits for every row that
    /// shares the step).
    fn check_arithmetic(&self) -> Result<(), LoraError> {
        if self.r == 0 {
            return Err(LoraError::Config("r must be at least 1".into()));
        }
        let s = self.scale();
        if !s.is_finite() || s.abs() > MAX_LORA_SCALE {
            return Err(LoraError::Config(format!(
                "lora_alpha {} with r {} gives scale {s:e}, outside +-{MAX_LORA_SCALE} (PEFT adapters use about 0.1-16)",
                self.lora_alpha, self.r
            )));
        }
        Ok(())
    }

    /// Refuses what `lab` does not implement, naming the cause.
    fn check_supported(&self) -> Result<(), LoraError> {
        let no = |m: &str| Err(LoraError::Unsupported(m.to_string()));
        if self.peft_type != "LORA" {
            return no(&format!("peft_type {} (only LORA)", self.peft_type));
        }
        if self.use_dora {
            return no("DoRA (use_dora=true)");
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return no("modules_to_save (full copies of base modules)");
        }
        if self.fan_in_fan_out {
            return no("fan_in_fan_out=true (Conv1D layout)");
        }
        if self.trainable_token_indices.as_ref().is_some_and(|v| !v.is_null()) {
            return no("trainable_token_indices (embedding updates)");
        }
        if self.target_parameters.as_ref().is_some_and(|v| !v.is_null()) {
            return no("target_parameters (LoRA on raw parameters)");
        }
        if self.lora_bias || self.bias.as_deref().is_some_and(|b| b != "none") {
            return no("LoRA bias (bias != none)");
        }
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return no("rank_pattern/alpha_pattern (per-module ranks)");
        }
        let names: Vec<String> = match &self.target_modules {
            TargetModules::List(l) => l.clone(),
            TargetModules::One(s) if s == "all-linear" => vec![],
            TargetModules::One(s) => vec![s.clone()],
        };
        for n in &names {
            if n == "embed_tokens" || n == "lm_head" {
                return no(&format!("LoRA on {n} (embedding/lm_head)"));
            }
            if LoraModule::from_name(n).is_none() {
                return no(&format!("target module {n} (lab supports q/k/v/o/gate/up/down_proj)"));
            }
        }
        Ok(())
    }
}

/// A parsed, validated adapter: per projection, `A: [r, in]`, `B: [out, r]`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub config: AdapterConfig,
    pub weights: BTreeMap<ProjKey, (Tensor, Tensor)>,
}

impl LoraAdapter {
    /// The adapter's rank.
    pub fn rank(&self) -> usize {
        self.config.r
    }

    pub fn scale(&self) -> f64 {
        self.config.scale()
    }

    /// Reads and validates a PEFT adapter directory against the base shape `cfg`.
    pub fn load(
        dir: &Path,
        cfg: &LlamaConfig,
        max_rank: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, LoraError> {
        Self::load_within(dir, None, cfg, max_rank, dtype, device)
    }

    /// [`LoraAdapter::load`], confined with `roots` (canonical paths): each file is refused
    /// unless the file it opened really lies inside one ([`LoraError::OutsideRoots`]), and it
    /// is read through that open file.
    pub fn load_within(
        dir: &Path,
        roots: Option<&[PathBuf]>,
        cfg: &LlamaConfig,
        max_rank: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self, LoraError> {
        // Sizes first, before anything is read whole: a config is a few hundred bytes, and the
        // weights of the largest adapter this base accepts are known from its shape.
        let mut files = file::AdapterFiles::open(dir, roots, (max_weights_bytes(cfg, max_rank), max_rank))?;
        let text = files.config_text()?;
        let config: AdapterConfig = serde_json::from_str(&text).map_err(|e| LoraError::Config(e.to_string()))?;
        config.check_supported()?;
        config.check_arithmetic()?;
        if config.r > max_rank {
            return Err(LoraError::RankTooLarge { rank: config.r, max: max_rank });
        }
        let tensors = files.tensors()?;
        // Finite in the file is not enough: f16 overflows past 65504 (bf16 just below f32's
        // maximum), so a value must also fit the run dtype when converting narrows it.
        let dtype_max = match dtype {
            DType::F16 => Some(f64::from(half::f16::MAX)),
            DType::BF16 => Some(f64::from(half::bf16::MAX)),
            _ => None,
        };
        let weights = parse_tensors(tensors, &config, cfg, (dtype, dtype_max)).map_err(|e| {
            match (e, &config.base_model_name_or_path) {
                (LoraError::ShapeMismatch(m), Some(base)) => {
                    LoraError::ShapeMismatch(format!("{m} (adapter made for {base})"))
                }
                (e, _) => e,
            }
        })?;
        let weights = weights
            .into_iter()
            .map(|(k, (a, b))| Ok((k, (a.to_dtype(dtype)?.to_device(device)?, b.to_dtype(dtype)?.to_device(device)?))))
            .collect::<Result<_, LoraError>>()?;
        Ok(Self { config, weights })
    }

    /// A random adapter of rank `r` on every projection of `cfg` (PEFT-style A, non-zero B):
    /// stands in for customers' adapters in benchmarks, never for a trained one.
    pub fn random(cfg: &LlamaConfig, r: usize, seed: u64, dtype: DType, device: &Device) -> Result<Self, LoraError> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut weights = BTreeMap::new();
        for layer in 0..cfg.num_hidden_layers {
            for module in LoraModule::ALL {
                let (inp, out) = module.dims(cfg);
                let bound = 1.0 / (inp as f32).sqrt();
                let a: Vec<f32> = (0..r * inp).map(|_| rng.gen_range(-bound..bound)).collect();
                let b: Vec<f32> = (0..out * r).map(|_| rng.gen_range(-0.01f32..0.01)).collect();
                let a = Tensor::from_vec(a, (r, inp), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?;
                let b = Tensor::from_vec(b, (out, r), &Device::Cpu)?.to_dtype(dtype)?.to_device(device)?;
                weights.insert(ProjKey { layer, module }, (a, b));
            }
        }
        Ok(Self { config: AdapterConfig::new(r, 2.0 * r as f64, &LoraModule::ALL, false, "random"), weights })
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir`, each atomically
    /// (temp file + rename), in f32.
    pub fn save(&self, dir: &Path) -> Result<(), LoraError> {
        self.save_as(dir, DType::F32)
    }

    /// [`LoraAdapter::save`] with the factors stored in `dtype` (PEFT keeps an adapter in its
    /// weights' dtype: f32 after f32 training, bf16 for one made in bf16).
    pub fn save_as(&self, dir: &Path, dtype: DType) -> Result<(), LoraError> {
        let io = |path: &Path, e| LoraError::Io { path: path.to_path_buf(), source: e };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let mut map: HashMap<String, Tensor> = HashMap::new();
        for (key, (a, b)) in &self.weights {
            let p = key.peft_prefix();
            map.insert(format!("{p}.lora_A.weight"), a.to_dtype(dtype)?.to_device(&Device::Cpu)?);
            map.insert(format!("{p}.lora_B.weight"), b.to_dtype(dtype)?.to_device(&Device::Cpu)?);
        }
        let tmp = dir.join(".adapter_model.safetensors.tmp");
        candle_core::safetensors::save(&map, &tmp)?;
        let dest = dir.join("adapter_model.safetensors");
        std::fs::rename(&tmp, &dest).map_err(|e| io(&dest, e))?;
        let json = serde_json::to_string_pretty(&self.config).expect("config serializes");
        let tmp = dir.join(".adapter_config.json.tmp");
        std::fs::write(&tmp, json).map_err(|e| io(&tmp, e))?;
        let dest = dir.join("adapter_config.json");
        std::fs::rename(&tmp, &dest).map_err(|e| io(&dest, e))
    }
}

/// PEFT keys -> validated `(A, B)` pairs.
fn parse_tensors(
    tensors: Vec<(String, Tensor, Option<f64>)>,
    config: &AdapterConfig,
    cfg: &LlamaConfig,
    (dtype, dtype_max): (DType, Option<f64>),
) -> Result<BTreeMap<ProjKey, (Tensor, Tensor)>, LoraError> {
    let mut a_map = BTreeMap::new();
    let mut b_map = BTreeMap::new();
    for (name, t, scan) in tensors {
        if name.contains("lora_embedding") || name.contains("embed_tokens") || name.contains("lm_head") {
            return Err(LoraError::Unsupported(format!("LoRA on embeddings/lm_head ({name})")));
        }
        if name.contains("lora_magnitude_vector") {
            return Err(LoraError::Unsupported(format!("DoRA ({name})")));
        }
        if name.contains("modules_to_save") {
            return Err(LoraError::Unsupported(format!("modules_to_save ({name})")));
        }
        let (key, is_a) = parse_key(&name).ok_or_else(|| LoraError::Unsupported(format!("tensor {name}")))?;
        if key.layer >= cfg.num_hidden_layers {
            return Err(LoraError::ShapeMismatch(format!(
                "{name}: layer {} but the base has {}",
                key.layer, cfg.num_hidden_layers
            )));
        }
        let Some(max) = scan else { return Err(LoraError::NonFinite(name)) };
        if let Some(limit) = dtype_max.filter(|_| t.dtype() != dtype) {
            if max > limit {
                let factor = if name.contains("lora_A") { "lora_A" } else { "lora_B" };
                return Err(LoraError::NonFinite(format!("{}.{factor} in {dtype:?}", key.peft_prefix())));
            }
        }
        if max > MAX_LORA_WEIGHT {
            return Err(LoraError::WeightTooLarge { name, max });
        }
        let (inp, out) = key.module.dims(cfg);
        let want = if is_a { vec![config.r, inp] } else { vec![out, config.r] };
        if t.dims() != want.as_slice() {
            if t.rank() == 2 && (if is_a { t.dim(1)? == inp } else { t.dim(0)? == out }) {
                return Err(LoraError::Config(format!("{name} has rank {:?} but r = {}", t.dims(), config.r)));
            }
            return Err(LoraError::ShapeMismatch(format!("{name} is {:?}, the base needs {:?}", t.dims(), want)));
        }
        if is_a {
            a_map.insert(key, t)
        } else {
            b_map.insert(key, t)
        };
    }
    let mut out = BTreeMap::new();
    for (key, a) in a_map {
        let b = b_map
            .remove(&key)
            .ok_or_else(|| LoraError::ShapeMismatch(format!("{}: lora_A without lora_B", key.peft_prefix())))?;
        out.insert(key, (a, b));
    }
    if let Some(key) = b_map.keys().next() {
        return Err(LoraError::ShapeMismatch(format!("{}: lora_B without lora_A", key.peft_prefix())));
    }
    if out.is_empty() {
        return Err(LoraError::Config("no LoRA weights in adapter_model.safetensors".into()));
    }
    Ok(out)
}

/// `base_model.model.model.layers.{i}.{parent}.{module}.lora_{A|B}[.default].weight`.
fn parse_key(name: &str) -> Option<(ProjKey, bool)> {
    let rest = name.strip_prefix("base_model.model.model.layers.")?;
    let rest = rest.strip_suffix(".weight")?;
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    let parts: Vec<&str> = rest.split('.').collect();
    let [layer, _parent, module, ab] = parts.as_slice() else { return None };
    let is_a = match *ab {
        "lora_A" => true,
        "lora_B" => false,
        _ => return None,
    };
    Some((ProjKey { layer: layer.parse().ok()?, module: LoraModule::from_name(module)? }, is_a))
}
