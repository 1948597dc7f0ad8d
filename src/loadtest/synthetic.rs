//! Synthetic prompts of a given length in the *server's* tokens.
//!
//! The load tester cannot know the server's tokenizer (one word is one token for a BPE
//! vocabulary, five or six for a byte-level one, and the chat template adds its own), so the
//! length is calibrated against the server: two probe requests (`max_tokens: 1`) report their
//! `usage.prompt_tokens`, a line through them gives tokens per word and the template's fixed
//! cost, and the prompt gets the word count that lands on `input_len`.

use std::time::Duration;

use serde_json::json;

use crate::engine::text::tokenizer::ChatMessage;

/// Short common words: one token each in BPE vocabularies.
const WORDS: [&str; 8] = ["data", "model", "query", "token", "server", "adapter", "batch", "cache"];

/// A user message of `words` words.
pub fn message(words: usize) -> Vec<ChatMessage> {
    let text: Vec<&str> = (0..words).map(|i| WORDS[(i * 7 + i / 8) % WORDS.len()]).collect();
    vec![ChatMessage::new("user", &text.join(" "))]
}

/// The calibration's outcome.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibrated {
    pub words: usize,
    /// The server's prompt tokens for that many words (`None`: the server reports no usage,
    /// so one word is taken as one token).
    pub prompt_tokens: Option<usize>,
}

/// The word count whose prompt is closest to `input_len` server tokens, from the token counts
/// of two probes `(words, tokens)`.
pub fn words_for(input_len: usize, a: (usize, usize), b: (usize, usize)) -> usize {
    let (dw, dt) = (b.0 as f64 - a.0 as f64, b.1 as f64 - a.1 as f64);
    if dw == 0.0 || dt <= 0.0 {
        return input_len.max(1);
    }
    let per_word = dt / dw;
    let fixed = a.1 as f64 - per_word * a.0 as f64;
    (((input_len as f64 - fixed) / per_word).round() as usize).max(1)
}

/// Asks the server how many prompt tokens `words` words take for `model`.
async fn probe(
    client: &reqwest::Client,
    base: &str,
    key: Option<&str>,
    model: &str,
    words: usize,
) -> Result<Option<usize>, String> {
    let body = json!({"model": model, "messages": message(words), "max_tokens": 1, "temperature": 0});
    let mut req = client.post(format!("{base}/chat/completions")).json(&body).timeout(Duration::from_secs(120));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.map_err(|e| format!("calibration request to {base}: {e}"))?;
    let status = resp.status();
    // A reply that is not JSON (a server that always streams) reports no usage: not an error.
    let v: Option<serde_json::Value> = resp.json().await.ok();
    if !status.is_success() {
        let detail = v.map(|v| v.to_string()).unwrap_or_default();
        return Err(format!("calibration request for {model} got {status}: {detail}"));
    }
    Ok(v.and_then(|v| v["usage"]["prompt_tokens"].as_u64()).map(|n| n as usize))
}

/// Calibrates a prompt of about `input_len` server tokens for `model`.
pub async fn calibrate(
    client: &reqwest::Client,
    base: &str,
    key: Option<&str>,
    model: &str,
    input_len: usize,
) -> Result<Calibrated, String> {
    let (w1, w2) = (input_len.max(2), (input_len / 2).max(1));
    let (Some(t1), Some(t2)) = (probe(client, base, key, model, w1).await?, probe(client, base, key, model, w2).await?)
    else {
        return Ok(Calibrated { words: input_len.max(1), prompt_tokens: None });
    };
    let words = words_for(input_len, (w2, t2), (w1, t1));
    let tokens = probe(client, base, key, model, words).await?;
    Ok(Calibrated { words, prompt_tokens: tokens })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_word_count_lands_on_the_target_for_bpe_and_byte_level_servers() {
        // BPE: one token a word, a 30-token template.
        assert_eq!(words_for(256, (128, 158), (256, 286)), 226);
        // Byte level: about 6 tokens a word ("data " ...), a 60-token template.
        let tokens = |w: usize| 60 + 6 * w;
        assert_eq!(words_for(256, (128, tokens(128)), (256, tokens(256))), 33);
        // A server that counts nothing useful: the target itself.
        assert_eq!(words_for(256, (128, 10), (256, 10)), 256);
    }
}
