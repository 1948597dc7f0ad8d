//! Incremental detokenization with stop strings: token ids in, safe-to-show text out.

use crate::engine::text::tokenizer::Tokenizer;
use crate::engine::Result;

/// Turns a growing list of output ids into text deltas.
///
/// Text is held back while it could still be (a) an incomplete UTF-8 character or (b) the start
/// of a stop string, so a streamed response never shows text that is later taken back.
#[derive(Debug, Clone, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Decoded text of all ids so far (complete characters only).
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    stop: Vec<String>,
    stopped: bool,
}

impl Detokenizer {
    pub fn new(stop: Vec<String>) -> Self {
        Self { stop: stop.into_iter().filter(|s| !s.is_empty()).collect(), ..Default::default() }
    }

    /// Adds one token; returns the new text that is safe to show.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        if self.stopped {
            return Ok(String::new());
        }
        self.ids.push(id);
        let full = tok.decode(&self.ids, true)?;
        if full.ends_with('\u{FFFD}') {
            return Ok(String::new()); // an incomplete multi-byte character: wait for the rest
        }
        self.text = full;
        if let Some(cut) = self.stop.iter().filter_map(|s| self.text.find(s.as_str())).min() {
            self.text.truncate(cut);
            self.stopped = true;
            return Ok(self.take(self.text.len()));
        }
        let hold = self.stop_prefix_len();
        Ok(self.take(self.text.len() - hold))
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

    /// Length of the longest suffix of the text that is a proper prefix of a stop string.
    fn stop_prefix_len(&self) -> usize {
        let t = self.text.as_bytes();
        self.stop.iter().flat_map(|s| (1..s.len()).filter(move |&k| t.ends_with(&s.as_bytes()[..k]))).max().unwrap_or(0)
    }
}
