//! `lab eval`'s scorers, exactly as DESIGN §4: A by SQLite execution on the seeded shop
//! database, B by the two triage fields, C by the tool call's name and arguments.
//!
//! Every scorer first strips surrounding whitespace and one trailing `<|im_end|>`; nothing else
//! is forgiven (a JSON answer must be one object followed by nothing).

mod sql;
mod tools;
mod triage;

#[cfg(test)]
mod tests;

use std::cell::RefCell;

use crate::datasets::Domain;

pub use crate::datasets::shop::shop_database;
pub use sql::SqlScorer;

/// A JSON field as a person reads it in a miss: the value as JSON, or `missing`.
fn shown(v: Option<&serde_json::Value>) -> String {
    v.map_or_else(|| "missing".to_string(), |v| v.to_string())
}

/// Errors from setting up a scorer.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("shop database: {0}")]
    Database(#[from] rusqlite::Error),
}

/// One scored prediction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Score {
    pub correct: bool,
    /// "ok", or why the prediction was wrong.
    pub detail: String,
}

impl Score {
    fn ok() -> Self {
        Score { correct: true, detail: "ok".to_string() }
    }

    fn wrong(detail: impl Into<String>) -> Self {
        Score { correct: false, detail: detail.into() }
    }
}

/// The prediction with surrounding whitespace and one trailing `<|im_end|>` removed.
pub fn clean_prediction(predicted: &str) -> &str {
    let trimmed = predicted.trim();
    trimmed.strip_suffix("<|im_end|>").unwrap_or(trimmed).trim()
}

/// Scores many predictions, building the shop database once.
pub struct Scorer {
    sql: SqlScorer,
}

impl Scorer {
    /// Builds the seeded shop database.
    pub fn new() -> Result<Self, EvalError> {
        Ok(Scorer { sql: SqlScorer::new()? })
    }

    /// Whether `predicted` answers like `gold` does, under `domain`'s rule.
    pub fn score(&self, domain: Domain, gold: &str, predicted: &str) -> Score {
        let predicted = clean_prediction(predicted);
        match domain {
            Domain::A => self.sql.score(gold, predicted),
            Domain::B => triage::score(gold, predicted),
            Domain::C => tools::score(gold, predicted),
        }
    }
}

thread_local! {
    // A `Connection` is not `Sync`; one scorer per thread avoids rebuilding the database on
    // every call of `score`.
    static SCORER: RefCell<Option<Scorer>> = const { RefCell::new(None) };
}

/// Whether `predicted` answers like `gold` does, under `domain`'s rule. Builds the shop
/// database once per thread; use [`Scorer`] to control that.
pub fn score(domain: Domain, gold: &str, predicted: &str) -> Score {
    SCORER.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            match Scorer::new() {
                Ok(scorer) => *slot = Some(scorer),
                Err(e) => return Score::wrong(e.to_string()),
            }
        }
        match slot.as_ref() {
            Some(scorer) => scorer.score(domain, gold, predicted),
            None => Score::wrong("no scorer"),
        }
    })
}
