//! Scorer tests: every generated gold answer scores as correct against itself, and wrong
//! answers of each kind are rejected.

use super::*;
use crate::datasets::tests::generated;

fn scorer() -> Scorer {
    Scorer::new().expect("shop database")
}

#[test]
fn every_generated_gold_answer_scores_correct() {
    let scorer = scorer();
    for domain in Domain::ALL {
        let (train, eval) = generated(domain);
        // All of eval, and a slice of train (the SQL scorer runs two queries per example).
        for example in eval.iter().chain(train.iter().step_by(10)) {
            let gold = example.answer();
            let s = scorer.score(domain, gold, &format!("  {gold}<|im_end|>\n"));
            assert!(s.correct, "{domain}: {gold}: {}", s.detail);
        }
    }
}

const GOLD_SQL: &str = "SELECT COUNT(*) FROM customers WHERE city = 'Paris'";

#[test]
fn sql_wrong_filter_is_wrong() {
    let s = scorer().score(Domain::A, GOLD_SQL, "SELECT COUNT(*) FROM customers WHERE city = 'Berlin'");
    assert!(!s.correct, "{}", s.detail);
}

#[test]
fn sql_ignores_aliases_and_equivalent_forms() {
    let scorer = scorer();
    for predicted in [
        "SELECT COUNT(id) AS n FROM customers AS c WHERE c.city = 'Paris';",
        "select count(*) from customers where city='Paris'",
        "SELECT COUNT(*) FROM customers WHERE city IN ('Paris')",
    ] {
        let s = scorer.score(Domain::A, GOLD_SQL, predicted);
        assert!(s.correct, "{predicted}: {}", s.detail);
    }
    let gold = "SELECT category, AVG(price) FROM products GROUP BY category";
    let s = scorer.score(
        Domain::A,
        gold,
        "SELECT p.category AS cat, SUM(p.price) / COUNT(*) FROM products p GROUP BY 1 ORDER BY 1 DESC",
    );
    assert!(s.correct, "multiset compare when gold has no ORDER BY: {}", s.detail);
}

#[test]
fn sql_respects_order_by() {
    let scorer = scorer();
    let gold = "SELECT name FROM products ORDER BY price DESC LIMIT 5";
    assert!(scorer.score(Domain::A, gold, "SELECT name FROM products ORDER BY price DESC LIMIT 5").correct);
    let reversed = "SELECT name FROM (SELECT name, price FROM products ORDER BY price DESC LIMIT 5) ORDER BY price";
    let s = scorer.score(Domain::A, gold, reversed);
    assert!(!s.correct, "same rows, wrong order must fail");
}

#[test]
fn sql_rejects_writes_multiple_statements_and_non_selects() {
    let scorer = scorer();
    for predicted in [
        "DELETE FROM customers",
        "SELECT COUNT(*) FROM customers WHERE city = 'Paris'; DELETE FROM customers",
        "SELECT COUNT(*) FROM customers WHERE city = 'Paris'; SELECT 1",
        "PRAGMA table_info(customers)",
        "ATTACH DATABASE ':memory:' AS x",
        "DROP TABLE customers",
        "WITH x AS (SELECT 1) DELETE FROM customers",
        "CREATE TABLE t (a)",
        "SELECT COUNT(*) FROM nowhere",
        "",
    ] {
        let s = scorer.score(Domain::A, GOLD_SQL, predicted);
        assert!(!s.correct, "{predicted:?} must score 0");
    }
    // Nothing above changed the database.
    assert!(scorer.score(Domain::A, "SELECT COUNT(*) FROM customers", "SELECT 200").correct);
    let s = scorer.score(Domain::A, "SELECT ';'", "SELECT ';'");
    assert!(s.correct, "a ';' inside a string is not a second statement: {}", s.detail);
}

#[test]
fn sql_runaway_query_is_interrupted() {
    let started = std::time::Instant::now();
    let cross = "SELECT COUNT(*) FROM order_items a, order_items b, order_items c, order_items d";
    let s = scorer().score(Domain::A, GOLD_SQL, cross);
    assert!(!s.correct);
    assert!(started.elapsed().as_secs() < 10, "took {:?}: {}", started.elapsed(), s.detail);
}

#[test]
fn sql_reals_round_to_four_decimals() {
    let s = scorer().score(Domain::A, "SELECT 0.1 + 0.2", "SELECT 0.3");
    assert!(s.correct, "{}", s.detail);
    assert!(scorer().score(Domain::A, "SELECT 3", "SELECT 3.0").correct);
    assert!(!scorer().score(Domain::A, "SELECT 3", "SELECT '3'").correct);
}

const GOLD_TRIAGE: &str = "{\"category\": \"billing\", \"priority\": \"high\"}";

#[test]
fn triage_fields_must_match() {
    let scorer = scorer();
    assert!(scorer.score(Domain::B, GOLD_TRIAGE, "{\"priority\":\"high\",\"category\":\"billing\"}").correct);
    for predicted in [
        "{\"category\": \"billing\", \"priority\": \"urgent\"}",
        "{\"category\": \"refund\", \"priority\": \"high\"}",
        "{\"category\": \"billing\", \"priority\": \"high\"",
        "{\"category\": \"billing\", \"priority\": \"high\"} thanks",
        "{\"category\": \"billing\"}",
        "{\"category\": \"billing\", \"priority\": \"high\", \"note\": 1}",
        "[\"billing\", \"high\"]",
        "billing, high",
    ] {
        assert!(!scorer.score(Domain::B, GOLD_TRIAGE, predicted).correct, "{predicted}");
    }
}

const GOLD_TOOL: &str =
    "{\"name\": \"convert_currency\", \"arguments\": {\"amount\": 12.5, \"from\": \"EUR\", \"to\": \"JPY\"}}";

#[test]
fn tool_calls_compare_numbers_strings_and_codes() {
    let scorer = scorer();
    let loose =
        "{\"arguments\": {\"to\": \"jpy\", \"amount\": 12.50, \"from\": \" EUR \"}, \"name\": \"convert_currency\"}";
    let s = scorer.score(Domain::C, GOLD_TOOL, loose);
    assert!(s.correct, "{}", s.detail);
    for predicted in [
        "{\"name\": \"convert_currency\", \"arguments\": {\"amount\": 12.5, \"from\": \"EUR\", \"to\": \"USD\"}}",
        "{\"name\": \"convert_currency\", \"arguments\": {\"amount\": 125, \"from\": \"EUR\", \"to\": \"JPY\"}}",
        "{\"name\": \"convert_currency\", \"arguments\": {\"amount\": \"12.5\", \"from\": \"EUR\", \"to\": \"JPY\"}}",
        "{\"name\": \"get_weather\", \"arguments\": {\"amount\": 12.5, \"from\": \"EUR\", \"to\": \"JPY\"}}",
        "{\"name\": \"convert_currency\", \"arguments\": {\"amount\": 12.5, \"from\": \"EUR\"}}",
        "{\"name\": \"convert_currency\", \"arguments\": {\"amount\": 12.5, \"from\": \"EUR\", \"to\": \"JPY\"}",
        "Sure! {\"name\": \"convert_currency\", \"arguments\": {\"amount\": 12.5, \"from\": \"EUR\", \"to\": \"JPY\"}}",
    ] {
        assert!(!scorer.score(Domain::C, GOLD_TOOL, predicted).correct, "{predicted}");
    }
    let gold = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\", \"unit\": \"celsius\"}}";
    let lower_city = "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"paris\", \"unit\": \"celsius\"}}";
    assert!(!scorer.score(Domain::C, gold, lower_city).correct, "only codes are case-insensitive");
}

#[test]
fn free_function_matches_scorer() {
    assert!(score(Domain::A, GOLD_SQL, GOLD_SQL).correct);
    assert!(score(Domain::B, GOLD_TRIAGE, &format!("{GOLD_TRIAGE}<|im_end|>")).correct);
    assert!(!score(Domain::C, GOLD_TOOL, "").correct);
}

#[test]
fn shop_database_has_the_documented_shape() {
    let conn = shop_database().expect("shop database");
    let count = |sql: &str| -> i64 { conn.query_row(sql, [], |row| row.get(0)).expect(sql) };
    assert_eq!(count("SELECT COUNT(*) FROM customers"), 200);
    assert_eq!(count("SELECT COUNT(*) FROM products"), 120);
    assert_eq!(count("SELECT COUNT(*) FROM orders"), 500);
    assert_eq!(count("SELECT COUNT(DISTINCT city) FROM customers"), 30);
    assert_eq!(count("SELECT COUNT(DISTINCT country) FROM customers"), 16);
    assert_eq!(count("SELECT COUNT(DISTINCT category) FROM products"), 10);
    assert_eq!(count("SELECT COUNT(DISTINCT price) FROM products"), 120, "prices are distinct");
    assert_eq!(count("SELECT COUNT(DISTINCT status) FROM orders"), 4);
    assert_eq!(count("SELECT COUNT(DISTINCT substr(order_date, 1, 4)) FROM orders"), 4, "2022-2025");
    let items = count("SELECT COUNT(*) FROM order_items");
    assert!((1000..1500).contains(&items), "{items} order items");
    assert!(conn.execute("DELETE FROM customers", []).is_err(), "query_only");
}
