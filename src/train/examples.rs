//! Chat examples -> token ids with a loss mask (loss only on the last assistant turn).

use crate::engine::text::tokenizer::{ChatMessage, Tokenizer};

use super::TrainError;

/// One training sequence: token ids and, per id, whether predicting it is trained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedExample {
    pub ids: Vec<u32>,
    /// `mask[t]` = the loss includes predicting `ids[t]` from `ids[..t]`.
    pub mask: Vec<bool>,
}

impl TokenizedExample {
    /// Tokens that carry loss.
    pub fn loss_tokens(&self) -> usize {
        self.mask.iter().filter(|m| **m).count()
    }
}

/// Renders `messages` with the chat template; the target is the last assistant message.
///
/// The prompt is rendered with `add_generation_prompt` and must be a token prefix of the whole
/// conversation; the remaining tokens (the answer and its end-of-turn token) carry the loss.
/// Sequences longer than `max_len` keep their start and lose the tail of the answer.
pub fn tokenize_example(
    tok: &Tokenizer,
    messages: &[ChatMessage],
    max_len: usize,
) -> Result<TokenizedExample, TrainError> {
    let last = messages
        .last()
        .filter(|m| m.role == "assistant")
        .ok_or_else(|| TrainError::Data("an example must end with an assistant message (the target)".into()))?;
    let prompt = tok.apply_chat_template(&messages[..messages.len() - 1], true)?;
    let full = tok.apply_chat_template(messages, false)?;
    let prompt_ids = tok.encode(&prompt)?;
    let mut ids = tok.encode(&full)?;
    if !ids.starts_with(&prompt_ids) {
        return Err(TrainError::Data("the chat template's prompt is not a token prefix of the conversation".into()));
    }
    // Keep the answer up to and including its end-of-turn token; drop the template's trailing
    // newline so every trained token is something the model must produce at inference.
    let answer_ids = tok.encode(&last.content)?;
    let eot = ids[prompt_ids.len()..].iter().position(|id| tok.eos_ids().contains(id));
    if let Some(p) = eot {
        ids.truncate(prompt_ids.len() + p + 1);
    }
    if answer_ids.is_empty() {
        return Err(TrainError::Data("empty assistant answer".into()));
    }
    ids.truncate(max_len);
    let mask = (0..ids.len()).map(|t| t >= prompt_ids.len()).collect::<Vec<_>>();
    if !mask.iter().any(|m| *m) {
        return Err(TrainError::Data(format!("prompt alone is longer than --max-seq-len {max_len}")));
    }
    Ok(TokenizedExample { ids, mask })
}
