//! Domain A: execution accuracy on the seeded shop database.
//!
//! Both queries run on one in-memory database that is `query_only`; a prediction must also be a
//! single statement that starts with `SELECT` (or `WITH`) and that SQLite reports read-only, so
//! nothing it does can change what the next prediction sees. A watchdog interrupts queries that
//! run past the time limit (a cross join of the big tables would otherwise run for minutes).

use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use rusqlite::types::Value;
use rusqlite::Connection;

use super::Score;
use crate::datasets::shop::shop_database;

/// Longest a single query may run.
const TIME_LIMIT: Duration = Duration::from_secs(2);
/// More rows than any sensible answer; bounds memory for runaway predictions.
const MAX_ROWS: usize = 100_000;

/// Runs gold and predicted SQL on the shop database and compares their results.
pub struct SqlScorer {
    conn: Connection,
}

/// Result rows, each value normalised to a comparable string.
type Rows = Vec<Vec<String>>;

impl SqlScorer {
    /// Builds the seeded shop database.
    pub fn new() -> Result<Self, rusqlite::Error> {
        Ok(SqlScorer { conn: shop_database()? })
    }

    /// Correct when both queries return the same rows: as multisets, or in order when the
    /// gold query has `ORDER BY`. `predicted` should already be cleaned.
    pub fn score(&self, gold: &str, predicted: &str) -> Score {
        let want = match self.run(gold) {
            Ok(rows) => rows,
            Err(e) => return Score::wrong(format!("gold query: {e}")),
        };
        let got = match self.run(predicted) {
            Ok(rows) => rows,
            Err(e) => return Score::wrong(e),
        };
        let ordered = gold.to_ascii_uppercase().contains("ORDER BY");
        let same = if ordered { want == got } else { sorted(want.clone()) == sorted(got.clone()) };
        if same {
            Score::ok()
        } else {
            Score::wrong(format!(
                "different result: expected {} rows {}, got {} rows {}",
                want.len(),
                preview(&want),
                got.len(),
                preview(&got)
            ))
        }
    }

    /// Checks that `sql` is one read-only SELECT, then runs it under the time limit.
    pub fn run(&self, sql: &str) -> Result<Rows, String> {
        let body = single_statement(sql)?;
        let first = body.split_whitespace().next().unwrap_or("").to_ascii_uppercase();
        if first != "SELECT" && first != "WITH" {
            return Err(format!("not a SELECT: starts with {first:?}"));
        }
        let mut stmt = self.conn.prepare(body).map_err(|e| format!("does not compile: {e}"))?;
        if !stmt.readonly() {
            return Err("not read-only".to_string());
        }
        let (stop, stopped) = mpsc::channel::<()>();
        let handle = self.conn.get_interrupt_handle();
        let watchdog = thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(TIME_LIMIT) {
                handle.interrupt();
            }
        });
        let rows = collect_rows(&mut stmt);
        // Finalise the statement before stopping the watchdog: an interrupt that lands after
        // this point finds nothing running and is a no-op.
        drop(stmt);
        let _ = stop.send(());
        let _ = watchdog.join();
        rows
    }
}

fn collect_rows(stmt: &mut rusqlite::Statement<'_>) -> Result<Rows, String> {
    let columns = stmt.column_count();
    let mut rows = stmt.query([]).map_err(|e| format!("failed: {e}"))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(|e| format!("failed: {e}"))? {
        if out.len() == MAX_ROWS {
            return Err(format!("more than {MAX_ROWS} rows"));
        }
        let values = (0..columns).map(|i| row.get::<_, Value>(i).map(normalise));
        out.push(values.collect::<Result<Vec<_>, _>>().map_err(|e| format!("failed: {e}"))?);
    }
    Ok(out)
}

/// Numbers (integer or real) rounded to 4 decimals, so `3` equals `3.0` and float noise from
/// a different summation order doesn't matter; text is tagged so `'3'` differs from `3`.
fn normalise(value: Value) -> String {
    match value {
        Value::Null => "NULL".to_string(),
        Value::Integer(i) => number(i as f64),
        Value::Real(r) => number(r),
        Value::Text(s) => format!("'{s}'"),
        Value::Blob(b) => format!("x'{}'", b.iter().map(|byte| format!("{byte:02x}")).collect::<String>()),
    }
}

fn number(x: f64) -> String {
    // Adding 0.0 turns -0.0 into 0.0, so a rounded tiny negative prints like zero.
    format!("{:.4}", (x * 1e4).round() / 1e4 + 0.0)
}

fn sorted(mut rows: Rows) -> Rows {
    rows.sort();
    rows
}

fn preview(rows: &Rows) -> String {
    let shown: Vec<String> = rows.iter().take(3).map(|r| format!("({})", r.join(", "))).collect();
    let more = if rows.len() > 3 { ", ..." } else { "" };
    format!("[{}{more}]", shown.join(", "))
}

/// The statement without trailing `;`/whitespace, or an error if `sql` holds more than one
/// statement. Quotes and comments are skipped so a `;` inside a string literal is allowed.
fn single_statement(sql: &str) -> Result<&str, String> {
    let body = sql.trim().trim_end_matches(|c: char| c == ';' || c.is_whitespace());
    if body.is_empty() {
        return Err("empty query".to_string());
    }
    let bytes = body.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            quote @ (b'\'' | b'"' | b'`') => i = skip_past(bytes, i + 1, &[quote]),
            b'[' => i = skip_past(bytes, i + 1, b"]"),
            b'-' if bytes.get(i + 1) == Some(&b'-') => i = skip_past(bytes, i + 2, b"\n"),
            b'/' if bytes.get(i + 1) == Some(&b'*') => i = skip_past(bytes, i + 2, b"*/"),
            b';' => return Err("more than one statement".to_string()),
            _ => i += 1,
        }
    }
    Ok(body)
}

/// The index just past the next `end` at or after `from` (or the end of input).
fn skip_past(bytes: &[u8], from: usize, end: &[u8]) -> usize {
    (from..bytes.len()).find(|&j| bytes[j..].starts_with(end)).map_or(bytes.len(), |j| j + end.len())
}
