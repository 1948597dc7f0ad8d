//! Generator tests: sizes, determinism, held-out eval, the committed files, the system messages.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use super::*;

/// Each domain's (train, eval), generated once per test binary.
pub(crate) fn generated(domain: Domain) -> &'static (Vec<Example>, Vec<Example>) {
    static CACHE: OnceLock<Vec<(Vec<Example>, Vec<Example>)>> = OnceLock::new();
    let all = CACHE.get_or_init(|| {
        Domain::ALL.iter().map(|&d| generate_domain(d).unwrap_or_else(|e| panic!("{d}: {e}"))).collect()
    });
    &all[domain as usize]
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lab-datasets-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

const FILES: [&str; 10] = [
    "README.md",
    "a-sql/train.jsonl",
    "a-sql/eval.jsonl",
    "a-sql/README.md",
    "b-triage/train.jsonl",
    "b-triage/eval.jsonl",
    "b-triage/README.md",
    "c-tools/train.jsonl",
    "c-tools/eval.jsonl",
    "c-tools/README.md",
];

fn assert_same_files(a: &Path, b: &Path) {
    for file in FILES {
        let x = std::fs::read(a.join(file)).unwrap_or_else(|e| panic!("{}: {e}", a.join(file).display()));
        let y = std::fs::read(b.join(file)).unwrap_or_else(|e| panic!("{}: {e}", b.join(file).display()));
        assert!(x == y, "{file} differs between {} and {}", a.display(), b.display());
    }
}

#[test]
fn sizes_roles_and_domain_field() {
    for domain in Domain::ALL {
        let (train, eval) = generated(domain);
        assert_eq!((train.len(), eval.len()), (TRAIN_SIZE, EVAL_SIZE));
        for example in train.iter().chain(eval) {
            let roles: Vec<&str> = example.messages.iter().map(|m| m.role.as_str()).collect();
            assert_eq!(roles, ["user", "assistant"]);
            assert_eq!(example.domain, domain.letter());
        }
    }
}

#[test]
fn train_and_eval_user_messages_are_disjoint_and_unique() {
    for domain in Domain::ALL {
        let (train, eval) = generated(domain);
        let train_users: HashSet<&str> = train.iter().map(Example::user).collect();
        let eval_users: HashSet<&str> = eval.iter().map(Example::user).collect();
        assert_eq!(train_users.len(), train.len(), "{domain}: duplicate train messages");
        assert_eq!(eval_users.len(), eval.len(), "{domain}: duplicate eval messages");
        assert!(train_users.is_disjoint(&eval_users), "{domain}: eval message seen in train");
    }
}

#[test]
fn generate_all_twice_gives_identical_bytes() {
    let (a, b) = (temp_dir("twice-a"), temp_dir("twice-b"));
    generate_all(&a).expect("first run");
    generate_all(&b).expect("second run");
    assert_same_files(&a, &b);
    let _ = (std::fs::remove_dir_all(&a), std::fs::remove_dir_all(&b));
}

#[test]
fn committed_datasets_match_the_generator() {
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets");
    let fresh = temp_dir("committed");
    let summaries = generate_all(&fresh).expect("generate");
    assert_eq!(summaries.len(), 6);
    assert_same_files(&fresh, &committed);
    let _ = std::fs::remove_dir_all(&fresh);
}

/// Rewrites `datasets/` from the generator:
/// `cargo test --release --lib datasets::tests::regenerate_datasets -- --ignored`.
#[test]
#[ignore]
fn regenerate_datasets() {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets");
    for s in generate_all(&out).expect("generate") {
        println!("{} {:?}: {} examples, {} bytes, {}", s.domain, s.split, s.examples, s.bytes, s.path.display());
    }
}

#[test]
fn read_jsonl_round_trips_and_names_bad_lines() {
    let dir = temp_dir("read");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let path = dir.join("x.jsonl");
    let (train, _) = generated(Domain::B);
    write_jsonl(&path, &train[..3]).expect("write");
    assert_eq!(read_jsonl(&path).expect("read"), train[..3].to_vec());

    std::fs::write(&path, "{\"messages\": [], \"domain\": \"B\"}\n\n{oops\n").expect("write");
    let err = read_jsonl(&path).expect_err("bad lines");
    assert!(matches!(err, DatasetError::Parse { line: 1, .. }), "{err}");
    std::fs::write(&path, format!("{}\n{{oops\n", serde_json::to_string(&train[0]).expect("json"))).expect("write");
    let err = read_jsonl(&path).expect_err("bad line 2");
    assert!(matches!(err, DatasetError::Parse { line: 2, .. }), "{err}");
    let (good, bad) = read_jsonl_with(&path, BadLines::Skip).expect("skip bad lines");
    assert_eq!((good.len(), bad.len()), (1, 1));
    assert!(bad[0].to_string().ends_with("x.jsonl:2: key must be a string at line 1 column 2"), "{}", bad[0]);
    std::fs::write(
        &path,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n",
    )
    .expect("write");
    assert_eq!(read_jsonl(&path).expect("no domain field")[0].domain, "");
    std::fs::write(&path, "\n").expect("write");
    assert!(matches!(read_jsonl(&path), Err(DatasetError::Empty(_))));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn with_system_inserts_the_canonical_message_once() {
    let (train, _) = generated(Domain::C);
    let messages = with_system(&train[0], Domain::C);
    assert_eq!(messages[0], Message::new("system", Domain::C.system_message()));
    assert_eq!(&messages[1..], &train[0].messages[..]);
    let own = Example { messages: messages.clone(), domain: "C".to_string() };
    assert_eq!(with_system(&own, Domain::C), messages);
}

#[test]
fn domains_parse_from_letters_and_names() {
    for (text, domain) in
        [("A", Domain::A), ("sql", Domain::A), ("b", Domain::B), ("Triage", Domain::B), ("c-tools", Domain::C)]
    {
        assert_eq!(text.parse::<Domain>().expect(text), domain);
    }
    assert!("d".parse::<Domain>().is_err());
}

#[test]
fn system_messages_match_the_generators_tables() {
    for line in shop::SCHEMA.lines() {
        assert!(Domain::A.system_message().contains(line), "schema line missing: {line}");
    }
    for category in shop::CATEGORIES {
        assert!(Domain::A.system_message().contains(&format!("'{category}'")), "{category}");
    }
    for (city, code) in tools::AIRPORTS {
        assert!(Domain::C.system_message().contains(&format!("{city} {code}")), "{city} {code}");
    }
    for word in triage::CATEGORIES.iter().chain(&triage::PRIORITIES) {
        assert!(Domain::B.system_message().contains(&format!("{word} (")), "{word}");
    }
}

#[test]
fn eval_uses_held_out_phrasings_and_values() {
    // Crude but telling: some eval messages contain words that no train message contains.
    for domain in Domain::ALL {
        let (train, eval) = generated(domain);
        let train_words: HashSet<&str> = train.iter().flat_map(|e| e.user().split_whitespace()).collect();
        let novel = eval.iter().filter(|e| e.user().split_whitespace().any(|w| !train_words.contains(w))).count();
        assert!(novel > EVAL_SIZE / 4, "{domain}: only {novel} eval messages have unseen words");
    }
}

/// `datasets/*/handwritten.jsonl`: at least 30 questions per domain written by hand, none of
/// them a generated user message, each gold answer valid for its scorer (it scores itself
/// correct) and, for SQL, returning rows on the shop database.
#[test]
fn handwritten_sets_are_scorable_and_not_generated() {
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets");
    let scorer = crate::eval::Scorer::new().expect("scorer");
    let sql = crate::eval::SqlScorer::new().expect("shop database");
    for domain in Domain::ALL {
        let path = committed.join(domain.dir_name()).join("handwritten.jsonl");
        let hand = read_jsonl(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(hand.len() >= 30, "{}: {} examples", path.display(), hand.len());
        let (train, eval) = generated(domain);
        let seen: HashSet<&str> = train.iter().chain(eval).map(|e| e.user()).collect();
        for ex in &hand {
            assert!(!seen.contains(ex.user()), "{domain}: {:?} is a generated message", ex.user());
            let s = scorer.score(domain, ex.answer(), ex.answer());
            assert!(s.correct, "{domain}: {:?}: {}", ex.user(), s.detail);
            if domain == Domain::A {
                let rows = sql.run(ex.answer()).expect("gold runs");
                assert!(!rows.is_empty(), "{:?} returns no rows", ex.user());
            }
        }
    }
}
