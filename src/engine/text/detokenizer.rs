//! Incremental detokenization with stop strings: token ids in, safe-to-show text out.

use crate::engine::text::tokenizer::Tokenizer;
use crate::engine::Result;

/// Turns a growing list of output ids into text deltas, in O(new tokens) per token.
///
/// Text is held back while it could still be (a) an incomplete UTF-8 character or (b) the start
/// of a stop string, so a streamed response never shows text that is later taken back.
///
/// Decoding is incremental (as TGI and vLLM do it): only the ids from `prefix` on are decoded,
/// and the new text is what `ids[prefix..]` adds to `ids[prefix..read]`; the few tokens before
/// `read` give tokenizers that merge or strip spaces at a token boundary their context. Stop
/// strings are searched in the tail that the new text could complete, not the whole output.
#[derive(Debug, Clone, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the decode window.
    prefix: usize,
    /// Ids before this are in `text`.
    read: usize,
    /// Decoded text so far (complete characters only).
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    stop: Vec<String>,
    /// Longest stop string, in bytes.
    max_stop: usize,
    stopped: bool,
    /// Ids decoded in all (the cost; tests check it stays linear).
    decoded: usize,
}

impl Detokenizer {
    pub fn new(stop: Vec<String>) -> Self {
        let stop: Vec<String> = stop.into_iter().filter(|s| !s.is_empty()).collect();
        let max_stop = stop.iter().map(String::len).max().unwrap_or(0);
        Self { stop, max_stop, ..Default::default() }
    }

    /// Adds one token; returns the new text that is safe to show.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read], true)?;
        let after = tok.decode(&self.ids[self.prefix..], true)?;
        self.decoded += (self.read - self.prefix) + (self.ids.len() - self.prefix);
        if after.ends_with('\u{FFFD}') || after.len() <= before.len() || !after.is_char_boundary(before.len()) {
            return Ok(String::new()); // an incomplete multi-byte character (or nothing yet): wait
        }
        let old_len = self.text.len();
        self.text.push_str(&after[before.len()..]);
        self.prefix = self.read;
        self.read = self.ids.len();
        // A stop string ending in the new text starts at most max_stop - 1 bytes before it.
        let from = floor_char_boundary(&self.text, old_len.saturating_sub(self.max_stop.saturating_sub(1)));
        let window = &self.text[from..];
        if let Some(cut) = self.stop.iter().filter_map(|s| window.find(s.as_str())).min() {
            self.text.truncate(from + cut);
            self.stopped = true;
            return Ok(self.take(self.text.len()));
        }
        let hold = self.stop_prefix_len();
        Ok(self.take(self.text.len() - hold))
    }

    /// Ids decoded so far in all (for tests: stays linear in the output length).
    pub fn decoded_ids(&self) -> usize {
        self.decoded
    }

    /// Whether a stop string was seen (the output ends before it).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Hands out whatever was held back (at the end of generation).
    pub fn flush(&mut self) -> String {
        self.take(self.text.len())
    }

    /// The whole output text so far (without any stop string).
    pub fn text(&self) -> &str {
        &self.text
    }

    fn take(&mut self, upto: usize) -> String {
        let upto = (0..=upto).rev().find(|&i| self.text.is_char_boundary(i)).unwrap_or(0);
        if upto <= self.emitted {
            return String::new();
        }
        let s = self.text[self.emitted..upto].to_string();
        self.emitted = upto;
        s
    }

    /// Length of the longest suffix of the text that is a proper prefix of a stop string
    /// (bounded by the stop strings' lengths, which validation caps).
    fn stop_prefix_len(&self) -> usize {
        let t = self.text.as_bytes();
        self.stop.iter().flat_map(|s| (1..s.len()).filter(move |&k| t.ends_with(&s.as_bytes()[..k]))).max().unwrap_or(0)
    }
}

/// The largest char boundary of `s` at or below `i`.
fn floor_char_boundary(s: &str, i: usize) -> usize {
    (0..=i.min(s.len())).rev().find(|&j| s.is_char_boundary(j)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(tok: &Tokenizer, text: &str, stop: &[&str]) -> (String, String, bool, usize) {
        let ids = tok.encode(text).unwrap();
        let mut d = Detokenizer::new(stop.iter().map(|s| s.to_string()).collect());
        let mut streamed = String::new();
        for &id in &ids {
            streamed.push_str(&d.push(tok, id).unwrap());
            if d.stopped() {
                break;
            }
        }
        streamed.push_str(&d.flush());
        (streamed, d.text().to_string(), d.stopped(), d.decoded_ids())
    }

    #[test]
    fn streams_exactly_the_decoded_text_with_multibyte_characters() {
        let tok = Tokenizer::byte_level().unwrap();
        let text = "héllo wörld, 世界 🚀 done\nnext line\ttab";
        let (streamed, whole, stopped, _) = run(&tok, text, &[]);
        assert_eq!(streamed, text);
        assert_eq!(whole, text);
        assert!(!stopped);
    }

    #[test]
    fn stop_strings_cut_the_output_even_across_tokens_and_never_show() {
        let tok = Tokenizer::byte_level().unwrap();
        let (streamed, whole, stopped, _) = run(&tok, "SELECT 1; -- END of query", &["-- END", "never"]);
        assert_eq!(streamed, "SELECT 1; ");
        assert_eq!(whole, "SELECT 1; ");
        assert!(stopped);
        let (streamed, _, stopped, _) = run(&tok, "a 世界 b", &["界"]);
        assert_eq!(streamed, "a 世");
        assert!(stopped);
    }

    #[test]
    fn decoding_cost_is_linear_in_the_output() {
        let tok = Tokenizer::byte_level().unwrap();
        let text = "all work and no play ".repeat(500); // 10,500 tokens
        let (streamed, _, _, decoded) = run(&tok, &text, &["zzz"]);
        assert_eq!(streamed, text);
        let n = text.len();
        // Re-decoding the whole output per token would be n^2 / 2 = 55 million ids.
        assert!(decoded < 8 * n, "{decoded} ids decoded for {n} tokens");
    }
}
