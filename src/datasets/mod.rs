//! The three task domains (DESIGN §4): A `sql`, B `triage`, C `tools`. Seeded generators write
//! `train.jsonl` (2,000 examples) and `eval.jsonl` (200) per domain, byte for byte the same on
//! every run, plus the READMEs.
//!
//! Files hold user + assistant messages only; the domain's canonical system message is
//! inserted at train and eval time by [`with_system`], which keeps the files small and lets
//! anyone bring eval files of plain user/assistant pairs.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

mod readme;
pub mod shop;
mod sql;
mod sql_phrasings;
mod system;
mod text;
pub mod tools;
pub mod triage;

#[cfg(test)]
pub(crate) mod tests;

/// Examples per split.
pub const TRAIN_SIZE: usize = 2000;
/// Examples per split.
pub const EVAL_SIZE: usize = 200;

/// Errors from generating, writing or reading datasets.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {message}")]
    Parse { path: PathBuf, line: usize, message: String },
    #[error("{0}: no examples")]
    Empty(PathBuf),
    #[error("unknown domain {0:?} (expected A/sql, B/triage or C/tools)")]
    UnknownDomain(String),
    #[error("generator: {0}")]
    Generation(String),
    #[error("shop database: {0}")]
    Database(#[from] rusqlite::Error),
}

impl DatasetError {
    fn io(path: &Path, source: std::io::Error) -> Self {
        DatasetError::Io { path: path.to_path_buf(), source }
    }
}

/// A task domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Domain {
    /// Shop questions -> one SQLite `SELECT`.
    A,
    /// Support messages -> `{"category": C, "priority": P}`.
    B,
    /// Requests -> one tool call `{"name": N, "arguments": {...}}`.
    C,
}

impl Domain {
    /// All domains, in order.
    pub const ALL: [Domain; 3] = [Domain::A, Domain::B, Domain::C];

    /// "A", "B" or "C", as the JSONL `domain` field writes it.
    pub fn letter(self) -> &'static str {
        match self {
            Domain::A => "A",
            Domain::B => "B",
            Domain::C => "C",
        }
    }

    /// "sql", "triage" or "tools".
    pub fn name(self) -> &'static str {
        match self {
            Domain::A => "sql",
            Domain::B => "triage",
            Domain::C => "tools",
        }
    }

    /// The directory under `datasets/`: "a-sql", "b-triage", "c-tools".
    pub fn dir_name(self) -> &'static str {
        match self {
            Domain::A => "a-sql",
            Domain::B => "b-triage",
            Domain::C => "c-tools",
        }
    }

    /// The canonical system message (schema or catalogue), verbatim as in the domain's README.
    pub fn system_message(self) -> &'static str {
        match self {
            Domain::A => system::SQL,
            Domain::B => system::TRIAGE,
            Domain::C => system::TOOLS,
        }
    }

    fn seed(self, split: Split) -> u64 {
        let domain = match self {
            Domain::A => 0xA,
            Domain::B => 0xB,
            Domain::C => 0xC,
        };
        let split = match split {
            Split::Train => 1,
            Split::Eval => 2,
        };
        0x1AB0_0000 + domain * 16 + split
    }
}

impl FromStr for Domain {
    type Err = DatasetError;

    /// Accepts the letter, the name or the directory name, in any case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "a" | "sql" | "a-sql" => Ok(Domain::A),
            "b" | "triage" | "b-triage" => Ok(Domain::B),
            "c" | "tools" | "c-tools" => Ok(Domain::C),
            _ => Err(DatasetError::UnknownDomain(s.to_string())),
        }
    }
}

impl std::fmt::Display for Domain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.letter())
    }
}

/// Which split of a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

impl Split {
    /// "train.jsonl" or "eval.jsonl".
    pub fn file_name(self) -> &'static str {
        match self {
            Split::Train => "train.jsonl",
            Split::Eval => "eval.jsonl",
        }
    }

    /// Number of examples the generator writes.
    pub fn size(self) -> usize {
        match self {
            Split::Train => TRAIN_SIZE,
            Split::Eval => EVAL_SIZE,
        }
    }
}

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    /// A message with the given role and content.
    pub fn new(role: &str, content: &str) -> Self {
        Message { role: role.to_string(), content: content.to_string() }
    }
}

/// One JSONL line: `{"messages": [...], "domain": "A"}`. The last assistant message is the
/// target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    pub messages: Vec<Message>,
    /// "A", "B" or "C"; may be missing in files users bring (the command line names the domain).
    #[serde(default)]
    pub domain: String,
}

impl Example {
    /// The first user message's text ("" if none).
    pub fn user(&self) -> &str {
        self.messages.iter().find(|m| m.role == "user").map_or("", |m| m.content.as_str())
    }

    /// The last assistant message's text: the gold answer ("" if none).
    pub fn answer(&self) -> &str {
        self.messages.iter().rev().find(|m| m.role == "assistant").map_or("", |m| m.content.as_str())
    }
}

/// The example's messages, with `domain`'s canonical system message first when it has none.
pub fn with_system(example: &Example, domain: Domain) -> Vec<Message> {
    let mut messages = Vec::with_capacity(example.messages.len() + 1);
    if !example.messages.iter().any(|m| m.role == "system") {
        messages.push(Message::new("system", domain.system_message()));
    }
    messages.extend(example.messages.iter().cloned());
    messages
}

/// What to do with a JSONL line that does not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadLines {
    /// Fail on the first bad line.
    Stop,
    /// Skip bad lines and return their errors alongside the good examples.
    Skip,
}

/// Reads a JSONL file, failing on the first bad line (its error names `file:line`). Blank
/// lines are skipped; a file without examples is an error.
pub fn read_jsonl(path: &Path) -> Result<Vec<Example>, DatasetError> {
    read_jsonl_with(path, BadLines::Stop).map(|(examples, _)| examples)
}

/// Reads a JSONL file; with [`BadLines::Skip`] the bad lines' errors (each naming `file:line`)
/// come back next to the examples instead of stopping the read.
pub fn read_jsonl_with(path: &Path, bad: BadLines) -> Result<(Vec<Example>, Vec<DatasetError>), DatasetError> {
    let text = std::fs::read_to_string(path).map_err(|e| DatasetError::io(path, e))?;
    let mut examples = Vec::new();
    let mut skipped = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line) {
            Ok(example) => examples.push(example),
            Err(message) => {
                let err = DatasetError::Parse { path: path.to_path_buf(), line: i + 1, message };
                match bad {
                    BadLines::Stop => return Err(err),
                    BadLines::Skip => skipped.push(err),
                }
            }
        }
    }
    if examples.is_empty() {
        return Err(DatasetError::Empty(path.to_path_buf()));
    }
    Ok((examples, skipped))
}

fn parse_line(line: &str) -> Result<Example, String> {
    let example: Example = serde_json::from_str(line).map_err(|e| e.to_string())?;
    if example.answer().is_empty() {
        return Err("no assistant message".to_string());
    }
    Ok(example)
}

/// Writes examples as JSONL, one per line.
pub fn write_jsonl(path: &Path, examples: &[Example]) -> Result<(), DatasetError> {
    let mut text = String::new();
    for example in examples {
        // Serialising plain strings into JSON cannot fail.
        let line = serde_json::to_string(example).map_err(|e| DatasetError::Generation(e.to_string()))?;
        text.push_str(&line);
        text.push('\n');
    }
    std::fs::write(path, text).map_err(|e| DatasetError::io(path, e))
}

/// What `generate_all` wrote for one split.
#[derive(Debug, Clone)]
pub struct DatasetSummary {
    pub domain: Domain,
    pub split: Split,
    pub path: PathBuf,
    pub examples: usize,
    pub bytes: u64,
}

/// A domain's generator, behind one call: draw one (user, assistant) pair or reject the draw.
enum Generator {
    Sql(Box<sql::SqlGenerator>),
    Triage,
    Tools,
}

impl Generator {
    fn new(domain: Domain) -> Result<Self, DatasetError> {
        Ok(match domain {
            Domain::A => Generator::Sql(Box::new(sql::SqlGenerator::new()?)),
            Domain::B => Generator::Triage,
            Domain::C => Generator::Tools,
        })
    }

    fn sample(&mut self, rng: &mut ChaCha8Rng, split: Split) -> Result<Option<(String, String)>, DatasetError> {
        match self {
            Generator::Sql(g) => g.sample(rng, split),
            Generator::Triage => Ok(Some(triage::sample(rng, split))),
            Generator::Tools => Ok(Some(tools::sample(rng, split))),
        }
    }
}

/// Generates one split. User messages are unique within the split and never in `exclude`
/// (eval passes the train messages, so no eval question is a train question).
pub fn generate(domain: Domain, split: Split, exclude: &HashSet<String>) -> Result<Vec<Example>, DatasetError> {
    let mut generator = Generator::new(domain)?;
    let mut rng = ChaCha8Rng::seed_from_u64(domain.seed(split));
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(split.size());
    let max_draws = split.size() * 50;
    for _ in 0..max_draws {
        if out.len() == split.size() {
            break;
        }
        let Some((user, answer)) = generator.sample(&mut rng, split)? else { continue };
        if exclude.contains(&user) || !seen.insert(user.clone()) {
            continue;
        }
        let messages = vec![Message::new("user", &user), Message::new("assistant", &answer)];
        out.push(Example { messages, domain: domain.letter().to_string() });
    }
    if out.len() < split.size() {
        return Err(DatasetError::Generation(format!("{domain}: only {} unique examples", out.len())));
    }
    Ok(out)
}

/// Both splits of a domain: (train, eval).
pub fn generate_domain(domain: Domain) -> Result<(Vec<Example>, Vec<Example>), DatasetError> {
    let train = generate(domain, Split::Train, &HashSet::new())?;
    let train_users: HashSet<String> = train.iter().map(|e| e.user().to_string()).collect();
    let eval = generate(domain, Split::Eval, &train_users)?;
    Ok((train, eval))
}

/// Writes `out_dir/{a-sql,b-triage,c-tools}/{train,eval}.jsonl`, each domain's README.md and
/// the top-level README.md.
pub fn generate_all(out_dir: &Path) -> Result<Vec<DatasetSummary>, DatasetError> {
    let mut summaries = Vec::new();
    for domain in Domain::ALL {
        let dir = out_dir.join(domain.dir_name());
        std::fs::create_dir_all(&dir).map_err(|e| DatasetError::io(&dir, e))?;
        let (train, eval) = generate_domain(domain)?;
        for (split, examples) in [(Split::Train, &train), (Split::Eval, &eval)] {
            let path = dir.join(split.file_name());
            write_jsonl(&path, examples)?;
            let bytes = std::fs::metadata(&path).map_err(|e| DatasetError::io(&path, e))?.len();
            summaries.push(DatasetSummary { domain, split, path, examples: examples.len(), bytes });
        }
        let readme = dir.join("README.md");
        std::fs::write(&readme, readme::domain(domain, &train)).map_err(|e| DatasetError::io(&readme, e))?;
    }
    let readme = out_dir.join("README.md");
    std::fs::write(&readme, readme::top()).map_err(|e| DatasetError::io(&readme, e))?;
    Ok(summaries)
}
