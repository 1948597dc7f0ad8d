//! Helpers shared by the three generators: seeded picks, template filling, dates, numbers in
//! words, and the noise real users add (typos, casing, greetings, thanks).
//!
//! Everything takes the caller's `ChaCha8Rng`, so a generator's output depends only on its seed.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::Split;

/// Phrasings (or values) seen in both splits, and ones held out for the eval split.
pub(crate) struct Pool<T: 'static> {
    pub shared: &'static [T],
    pub held_out: &'static [T],
}

impl<T> Pool<T> {
    /// Train draws from `shared`; eval draws from `held_out` half the time, so eval measures
    /// both unseen phrasings/values and seen ones in new combinations.
    pub fn pick(&self, rng: &mut ChaCha8Rng, split: Split) -> &'static T {
        if split == Split::Eval && !self.held_out.is_empty() && rng.gen_bool(0.5) {
            pick(rng, self.held_out)
        } else {
            pick(rng, self.shared)
        }
    }
}

/// A uniformly chosen element. The pools are non-empty constants, so indexing cannot fail.
pub(crate) fn pick<'a, T>(rng: &mut ChaCha8Rng, items: &'a [T]) -> &'a T {
    &items[rng.gen_range(0..items.len())]
}

/// Replaces each `{key}` in `template` with its value.
pub(crate) fn fill(template: &str, slots: &[(&str, String)]) -> String {
    let mut out = template.to_string();
    for (key, value) in slots {
        out = out.replace(&format!("{{{key}}}"), value);
    }
    out
}

/// How much noise to add to a message.
pub(crate) struct Noise {
    /// Probability of one typo in the template's own words.
    pub typo: f64,
    /// Probability of writing the template's words in lower case.
    pub lowercase: f64,
    /// Probability of a greeting before and, separately, thanks after the message.
    pub politeness: f64,
}

const GREETINGS: Pool<&str> = Pool {
    shared: &["Hi, ", "Hello, ", "Hey, ", "Hi there! ", "Quick question: ", "Good morning. "],
    held_out: &["Yo, ", "Hiya - ", "Morning! "],
};
const THANKS: Pool<&str> = Pool {
    shared: &[" please", " thanks", " thx", " Thank you!", " Thanks in advance.", " pls"],
    held_out: &[" cheers", " much appreciated", " ty"],
};

/// Turns a template into a user message: a seeded typo and casing applied to the template's
/// own words (never to slot values, whose spelling the gold answer depends on), optional
/// greeting and thanks, then the slots filled in.
pub(crate) fn dress(
    rng: &mut ChaCha8Rng,
    split: Split,
    template: &str,
    slots: &[(&str, String)],
    noise: &Noise,
) -> String {
    let mut text = template.to_string();
    if rng.gen_bool(noise.typo) {
        text = typo(rng, &text);
    }
    let lower = rng.gen_bool(noise.lowercase);
    if lower {
        text = lowercase_outside_slots(&text);
    }
    if rng.gen_bool(noise.politeness) {
        let greeting = GREETINGS.pick(rng, split);
        text = if lower {
            format!("{}{text}", greeting.to_lowercase())
        } else {
            format!("{greeting}{}", lower_first(&text))
        };
    }
    if rng.gen_bool(noise.politeness) {
        let thanks = THANKS.pick(rng, split);
        text = format!("{}{thanks}", text.trim_end());
    }
    fill(&text, slots)
}

/// Lower-cases the first character, unless the word is "I" or an acronym-like token.
fn lower_first(text: &str) -> String {
    let first_word = text.split_whitespace().next().unwrap_or("");
    let keep = first_word == "I" || first_word.starts_with("I'") || first_word.starts_with('{');
    let acronym = first_word.len() > 1 && first_word.chars().take(2).all(|c| c.is_ascii_uppercase());
    if keep || acronym {
        text.to_string()
    } else {
        lowercase_first_char(text)
    }
}

fn lowercase_first_char(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn lowercase_outside_slots(text: &str) -> String {
    let mut depth = 0usize;
    text.chars()
        .map(|c| {
            match c {
                '{' => depth += 1,
                '}' => depth = depth.saturating_sub(1),
                _ => {}
            }
            if depth == 0 {
                c.to_ascii_lowercase()
            } else {
                c
            }
        })
        .collect()
}

/// One typo in a word of four or more letters outside `{slots}`: two letters swapped, one
/// dropped, or one doubled.
pub(crate) fn typo(rng: &mut ChaCha8Rng, text: &str) -> String {
    let words: Vec<&str> = text.split(' ').collect();
    let candidates: Vec<usize> = (0..words.len())
        .filter(|&i| words[i].len() >= 4 && words[i].chars().all(|c| c.is_ascii_alphabetic()))
        .collect();
    if candidates.is_empty() {
        return text.to_string();
    }
    let i = *pick(rng, &candidates);
    let mut letters: Vec<char> = words[i].chars().collect();
    // Keep the first letter: people rarely mistype it, and it keeps the word recognisable.
    let at = rng.gen_range(1..letters.len() - 1);
    match rng.gen_range(0..3) {
        0 => letters.swap(at, at + 1),
        1 => {
            letters.remove(at);
        }
        _ => letters.insert(at, letters[at]),
    }
    let changed: String = letters.into_iter().collect();
    let mut out: Vec<String> = words.iter().map(|w| w.to_string()).collect();
    out[i] = changed;
    out.join(" ")
}

const ONES: [&str; 20] = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
];
const TENS: [&str; 10] = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"];

/// English words for 0..=999 ("forty-five", "two hundred and ten"); digits beyond that.
pub(crate) fn number_words(n: u32) -> String {
    match n {
        0..=19 => ONES[n as usize].to_string(),
        20..=99 if n.is_multiple_of(10) => TENS[(n / 10) as usize].to_string(),
        20..=99 => format!("{}-{}", TENS[(n / 10) as usize], ONES[(n % 10) as usize]),
        100..=999 if n.is_multiple_of(100) => format!("{} hundred", ONES[(n / 100) as usize]),
        100..=999 => format!("{} hundred and {}", ONES[(n / 100) as usize], number_words(n % 100)),
        _ => n.to_string(),
    }
}

/// `n` in digits, or in words with probability `p_words`.
pub(crate) fn number(rng: &mut ChaCha8Rng, n: u32, p_words: f64) -> String {
    if rng.gen_bool(p_words) {
        number_words(n)
    } else {
        n.to_string()
    }
}

pub(crate) const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// A calendar date (always valid: days are drawn within the month's length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Date {
    pub year: u32,
    pub month: u32,
    pub day: u32,
}

impl Date {
    /// A uniformly drawn day of a year in `years`.
    pub fn random(rng: &mut ChaCha8Rng, years: std::ops::RangeInclusive<u32>) -> Date {
        let year = rng.gen_range(years);
        let month = rng.gen_range(1..=12);
        let day = rng.gen_range(1..=days_in_month(year, month));
        Date { year, month, day }
    }

    /// `YYYY-MM-DD`, the only form the answers use.
    pub fn iso(&self) -> String {
        format!("{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }

    /// The date as a user might write it. Day-first numeric dates are used only when the day is
    /// above 12, so no example is ambiguous between day-first and month-first readings.
    pub fn spoken(&self, rng: &mut ChaCha8Rng, split: Split) -> String {
        let month = MONTHS[(self.month - 1) as usize];
        let short = &month[..3];
        let (y, m, d) = (self.year, self.month, self.day);
        let shared = 4;
        let styles = if split == Split::Eval { 7 } else { shared };
        match rng.gen_range(0..styles) {
            0 => self.iso(),
            1 => format!("{month} {d}, {y}"),
            2 if d > 12 => format!("{d:02}/{m:02}/{y}"),
            2 | 3 => format!("{d} {month} {y}"),
            // Held out of train: abbreviated months, ordinals, and "the Nth of".
            4 => format!("{short} {d} {y}"),
            5 => format!("the {} of {month} {y}", ordinal(d)),
            _ => format!("{month} {}, {y}", ordinal(d)),
        }
    }
}

/// Days in a month of the Gregorian calendar.
pub(crate) fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// "1st", "2nd", "13th", "22nd".
pub(crate) fn ordinal(n: u32) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// A JSON string literal (quotes and escapes) for hand-built JSON with a fixed key order.
pub(crate) fn json_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn numbers_in_words() {
        assert_eq!(number_words(7), "seven");
        assert_eq!(number_words(45), "forty-five");
        assert_eq!(number_words(300), "three hundred");
        assert_eq!(number_words(210), "two hundred and ten");
    }

    #[test]
    fn typos_leave_slots_alone() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..50 {
            let t = typo(&mut rng, "How many customers live in {city}?");
            assert!(t.contains("{city}"), "{t}");
        }
    }

    #[test]
    fn dates_and_ordinals() {
        assert_eq!(Date { year: 2025, month: 3, day: 4 }.iso(), "2025-03-04");
        assert_eq!(ordinal(12), "12th");
        assert_eq!(ordinal(22), "22nd");
        assert_eq!(days_in_month(2024, 2), 29);
    }
}
