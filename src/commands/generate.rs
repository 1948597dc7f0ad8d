//! `lab generate`: one prompt in, text out (streamed, or one JSON object with timings).

use std::io::Write;

use anyhow::Context;
use serde_json::json;

use super::device_and_dtype;
use crate::cli::GenerateArgs;
use crate::engine::generate::generate;
use crate::engine::load::load_model;
use crate::engine::load::source::{lab_home, ModelSource};
use crate::engine::lora::LoraAdapter;
use crate::engine::sampling::SamplingParams;
use crate::engine::text::tokenizer::{ChatMessage, Tokenizer};

/// Runs `lab generate`.
pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let (device, dtype) = device_and_dtype(&args.model)?;
    let source = ModelSource::parse(args.model.model.as_deref())?;
    let loaded = load_model(&source, &lab_home(), dtype, &device)?;
    super::report_loaded(&loaded);
    let adapter = match &args.adapter {
        Some(a) => {
            let dir = resolve_adapter(a, &args.loras)?;
            let cfg = loaded.model.config();
            let adapter = LoraAdapter::load(&dir, cfg, args.max_lora_rank, dtype, &device)
                .with_context(|| format!("adapter {a} ({})", dir.display()))?;
            eprintln!(
                "lab: adapter {a}: rank {}, scale {:.3}, {} projections",
                adapter.rank(),
                adapter.scale(),
                adapter.weights.len()
            );
            Some(adapter)
        }
        None => None,
    };
    let prompt_ids = prompt_ids(args, &loaded.tokenizer)?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        max_tokens: args.max_tokens,
        ignore_eos: args.ignore_eos,
        stop: args.stop.clone(),
    };
    let stream = !args.json;
    let mut stdout = std::io::stdout();
    let gen = generate(&loaded.model, adapter.as_ref(), &loaded.tokenizer, &prompt_ids, &params, |piece| {
        if stream && !piece.is_empty() {
            let _ = write!(stdout, "{piece}");
            let _ = stdout.flush();
        }
    })?;
    if args.json {
        let out = json!({
            "model": loaded.name,
            "adapter": args.adapter,
            "synthetic": loaded.synthetic,
            "prompt_ids": prompt_ids,
            "output_ids": gen.output_ids,
            "text": gen.text,
            "finish_reason": gen.finish_reason,
            "prompt_tokens": prompt_ids.len(),
            "completion_tokens": gen.output_ids.len(),
            "prefill_ms": gen.prefill_ms,
            "decode_tokens_per_s": gen.decode_tokens_per_s,
        });
        println!("{out}");
    } else {
        println!();
    }
    Ok(())
}

/// Token ids of whichever of `--prompt`, `--messages`, `--raw` was given.
fn prompt_ids(args: &GenerateArgs, tok: &Tokenizer) -> anyhow::Result<Vec<u32>> {
    let text = if let Some(raw) = &args.raw {
        raw.clone()
    } else {
        let messages = match (&args.prompt, &args.messages) {
            (Some(p), _) => vec![ChatMessage::new("user", p)],
            (None, Some(path)) => read_messages(path)?,
            (None, None) => {
                anyhow::bail!("nothing to generate from: pass --prompt TEXT, --messages FILE or --raw TEXT")
            }
        };
        tok.apply_chat_template(&messages, true)?
    };
    Ok(tok.encode(&text)?)
}

fn read_messages(path: &std::path::Path) -> anyhow::Result<Vec<ChatMessage>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading --messages {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let list = v.get("messages").cloned().unwrap_or(v);
    serde_json::from_value(list).with_context(|| {
        format!("{}: expected an OpenAI messages array [{{\"role\": ..., \"content\": ...}}]", path.display())
    })
}

/// `--adapter NAME` (from `--lora NAME=PATH`) or `--adapter PATH` -> the adapter directory.
fn resolve_adapter(adapter: &str, loras: &[String]) -> anyhow::Result<std::path::PathBuf> {
    for spec in loras {
        let (name, path) = spec.split_once('=').with_context(|| format!("--lora {spec}: expected NAME=PATH"))?;
        if name == adapter {
            return Ok(path.into());
        }
    }
    let p = std::path::Path::new(adapter);
    if p.is_dir() {
        return Ok(p.to_path_buf());
    }
    anyhow::bail!("unknown adapter {adapter}: pass --lora {adapter}=PATH or a PEFT adapter directory")
}
