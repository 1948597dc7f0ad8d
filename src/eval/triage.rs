//! Domain B: both fields equal after JSON parse.

use serde_json::{Map, Value};

use super::shown;
use super::Score;

const FIELDS: [&str; 2] = ["category", "priority"];

/// Parses `text` as exactly one JSON object (trailing text is an error).
fn parse_object(text: &str) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(format!("not a JSON object: {other}")),
        Err(e) => Err(format!("invalid JSON: {e}")),
    }
}

/// Both answers as JSON objects, or the wrong-answer score saying which one failed to parse.
pub(super) fn parse_pair(gold: &str, predicted: &str) -> Result<(Map<String, Value>, Map<String, Value>), Score> {
    let gold = parse_object(gold).map_err(|e| Score::wrong(format!("gold: {e}")))?;
    let predicted = parse_object(predicted).map_err(Score::wrong)?;
    Ok((gold, predicted))
}

pub(super) fn score(gold: &str, predicted: &str) -> Score {
    let (gold, predicted) = match parse_pair(gold, predicted) {
        Ok(pair) => pair,
        Err(score) => return score,
    };
    if predicted.len() != FIELDS.len() || !FIELDS.iter().all(|f| predicted.contains_key(*f)) {
        return Score::wrong(format!("keys must be exactly {FIELDS:?}"));
    }
    for field in FIELDS {
        if predicted.get(field) != gold.get(field) {
            return Score::wrong(format!(
                "{field}: expected {}, got {}",
                shown(gold.get(field)),
                shown(predicted.get(field))
            ));
        }
    }
    Score::ok()
}
