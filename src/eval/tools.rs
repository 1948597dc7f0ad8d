//! Domain C: name and arguments equal after JSON parse; numbers numerically, strings trimmed,
//! ISO/IATA codes case-insensitively.

use serde_json::Value;

use super::shown;
use super::triage::parse_pair;
use super::Score;

/// Arguments that hold ISO 4217 or IATA codes.
const CODE_ARGUMENTS: [&str; 4] = ["from", "to", "origin", "destination"];

pub(super) fn score(gold: &str, predicted: &str) -> Score {
    let (gold, predicted) = match parse_pair(gold, predicted) {
        Ok(pair) => pair,
        Err(score) => return score,
    };
    if predicted.len() != 2 || !predicted.contains_key("name") || !predicted.contains_key("arguments") {
        return Score::wrong("keys must be exactly [\"name\", \"arguments\"]");
    }
    let name = |v: Option<&Value>| v.and_then(Value::as_str).map(str::trim).map(str::to_string);
    if name(predicted.get("name")) != name(gold.get("name")) {
        return Score::wrong(format!(
            "name: expected {}, got {}",
            shown(gold.get("name")),
            shown(predicted.get("name"))
        ));
    }
    let (Some(Value::Object(want)), Some(Value::Object(got))) = (gold.get("arguments"), predicted.get("arguments"))
    else {
        return Score::wrong("arguments must be an object");
    };
    if want.len() != got.len() || !want.keys().all(|k| got.contains_key(k)) {
        let keys: Vec<&String> = got.keys().collect();
        return Score::wrong(format!("argument keys: expected {:?}, got {keys:?}", want.keys().collect::<Vec<_>>()));
    }
    for (key, w) in want {
        let Some(g) = got.get(key) else { return Score::wrong(format!("missing argument {key}")) };
        if !argument_eq(key, w, g) {
            return Score::wrong(format!("{key}: expected {w}, got {g}"));
        }
    }
    Score::ok()
}

fn argument_eq(key: &str, want: &Value, got: &Value) -> bool {
    match (want, got) {
        (Value::Number(w), Value::Number(g)) => match (w.as_f64(), g.as_f64()) {
            (Some(w), Some(g)) => (w - g).abs() <= 1e-9 * w.abs().max(1.0),
            _ => false,
        },
        (Value::String(w), Value::String(g)) if CODE_ARGUMENTS.contains(&key) => {
            w.trim().eq_ignore_ascii_case(g.trim())
        }
        (Value::String(w), Value::String(g)) => w.trim() == g.trim(),
        _ => want == got,
    }
}
