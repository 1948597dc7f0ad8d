//! Domain C: a free-text request -> one tool call `{"name": N, "arguments": {...}}` from the
//! fixed catalogue in the system message. Arguments are normalised in the answer: dates to
//! `YYYY-MM-DD`, times to 24-hour `HH:MM`, currencies to ISO codes, cities to IATA codes,
//! durations to whole minutes, `unit` to `celsius` unless the request says otherwise.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::text::{dress, json_str, number, number_words, pick, Date, Noise, Pool};
use super::Split;

const NOISE: Noise = Noise { typo: 0.06, lowercase: 0.1, politeness: 0.25 };

type P = Pool<&'static str>;

/// The airports the system message lists: (city, IATA code).
pub const AIRPORTS: &[(&str, &str)] = &[
    ("London", "LHR"),
    ("Paris", "CDG"),
    ("New York", "JFK"),
    ("Los Angeles", "LAX"),
    ("Tokyo", "HND"),
    ("Berlin", "BER"),
    ("Madrid", "MAD"),
    ("Rome", "FCO"),
    ("Amsterdam", "AMS"),
    ("Frankfurt", "FRA"),
    ("Dubai", "DXB"),
    ("Singapore", "SIN"),
    ("Sydney", "SYD"),
    ("Toronto", "YYZ"),
    ("Chicago", "ORD"),
    ("San Francisco", "SFO"),
    ("Barcelona", "BCN"),
    ("Lisbon", "LIS"),
    ("Istanbul", "IST"),
    ("Seoul", "ICN"),
];

/// (ISO code, names used in both splits, names held out for eval).
const CURRENCIES: &[(&str, &[&str], &[&str])] = &[
    ("USD", &["US dollars", "dollars", "USD"], &["American dollars"]),
    ("EUR", &["euros", "EUR", "euro"], &["Euro"]),
    ("GBP", &["British pounds", "pounds", "GBP"], &["pounds sterling"]),
    ("JPY", &["yen", "Japanese yen", "JPY"], &[]),
    ("CHF", &["Swiss francs", "CHF"], &["francs"]),
    ("CAD", &["Canadian dollars", "CAD"], &[]),
    ("AUD", &["Australian dollars", "AUD"], &["Aussie dollars"]),
    ("CNY", &["Chinese yuan", "yuan", "CNY"], &[]),
    ("INR", &["Indian rupees", "rupees", "INR"], &[]),
    ("SEK", &["Swedish kronor", "SEK"], &[]),
    ("MXN", &["Mexican pesos", "MXN"], &["pesos"]),
];

static WEATHER_CITIES: Pool<&str> = Pool {
    shared: &[
        "London", "Paris", "New York", "Tokyo", "Berlin", "Madrid", "Rome", "Oslo", "Cairo", "Mumbai", "Vienna",
        "Prague", "Athens", "Bangkok", "Montreal", "Denver", "Sydney", "Dublin", "Nairobi", "Lima",
    ],
    held_out: &["Helsinki", "Reykjavik", "Cape Town", "Buenos Aires", "Hanoi", "Zurich"],
};
static WEATHER: P = P {
    shared: &[
        "What's the weather in {city}{unit}?",
        "weather {city}{unit}",
        "How's the weather looking in {city}{unit}?",
        "Tell me the current weather for {city}{unit}.",
        "Is it cold in {city} right now{unit}?",
    ],
    held_out: &["Can you check the forecast for {city}{unit}?", "I'm heading to {city}, what's it like there{unit}?"],
};
static CELSIUS: P = P { shared: &[" in celsius", " in °C", " in Celsius"], held_out: &[" in degrees C"] };
static FAHRENHEIT: P = P { shared: &[" in fahrenheit", " in °F", " in Fahrenheit"], held_out: &[" in degrees F"] };

static CONVERT: P = P {
    shared: &[
        "Convert {amount} {from} to {to}",
        "How much is {amount} {from} in {to}?",
        "What's {amount} {from} in {to}?",
        "{amount} {from} to {to}",
        "Change {amount} {from} into {to}.",
    ],
    held_out: &["If I have {amount} {from}, how many {to} is that?", "Exchange {amount} {from} for {to}"],
};

static TITLES: Pool<&str> = Pool {
    shared: &[
        "Dentist appointment",
        "Team standup",
        "Lunch with Sam",
        "Project review",
        "Yoga class",
        "Call with the bank",
        "Birthday party",
        "Book club",
        "Parent-teacher meeting",
        "Car service",
    ],
    held_out: &["Coffee with Maria", "Quarterly planning", "Piano lesson"],
};
static EVENT: P = P {
    shared: &[
        "Add {title} to my calendar on {date} at {time}",
        "Create an event called {title} on {date} at {time}.",
        "Schedule {title} for {date}, {time}",
        "Put \"{title}\" in my calendar for {date} at {time}",
        "New event: {title}, {date} at {time}",
    ],
    held_out: &[
        "Can you book {title} on {date} at {time}?",
        "Set up a calendar entry \"{title}\" at {time} on {date}.",
    ],
};

static TIMER: P = P {
    shared: &[
        "Set a timer for {dur}",
        "Timer for {dur} please",
        "Start a timer: {dur}.",
        "Can you set a timer for {dur}?",
        "Count down {dur}",
    ],
    held_out: &["Remind me in {dur} with a timer", "I need a timer of {dur}."],
};

static FLIGHTS: P = P {
    shared: &[
        "Find flights from {origin} to {destination} on {date}",
        "Search flights {origin} to {destination}, {date}",
        "Any flights from {origin} to {destination} on {date}?",
        "I need to fly from {origin} to {destination} on {date}.",
        "Show me flights {origin} -> {destination} for {date}",
    ],
    held_out: &[
        "Looking for a flight to {destination} from {origin} on {date}",
        "Flights on {date} from {origin} to {destination}?",
    ],
};

/// One (request, gold tool call) pair.
pub(crate) fn sample(rng: &mut ChaCha8Rng, split: Split) -> (String, String) {
    let (phrasings, slots, name, args) = match rng.gen_range(0..5) {
        0 => weather(rng, split),
        1 => currency(rng, split),
        2 => event(rng, split),
        3 => timer(rng, split),
        _ => flights(rng, split),
    };
    let template = phrasings.pick(rng, split);
    let request = dress(rng, split, template, &slots, &NOISE);
    let args: Vec<String> = args.iter().map(|(k, v)| format!("{}: {v}", json_str(k))).collect();
    (request, format!("{{\"name\": {}, \"arguments\": {{{}}}}}", json_str(name), args.join(", ")))
}

/// (phrasings, slots, tool name, arguments as (key, JSON value text) in catalogue order)
type Drawn = (&'static P, Vec<(&'static str, String)>, &'static str, Vec<(&'static str, String)>);

fn weather(rng: &mut ChaCha8Rng, split: Split) -> Drawn {
    let city = *WEATHER_CITIES.pick(rng, split);
    let fahrenheit = rng.gen_bool(0.3);
    let unit_text = match (fahrenheit, rng.gen_bool(0.3)) {
        (true, _) => FAHRENHEIT.pick(rng, split).to_string(),
        (false, true) => CELSIUS.pick(rng, split).to_string(),
        (false, false) => String::new(),
    };
    let unit = if fahrenheit { "fahrenheit" } else { "celsius" };
    let slots = vec![("city", city.to_string()), ("unit", unit_text)];
    (&WEATHER, slots, "get_weather", vec![("city", json_str(city)), ("unit", json_str(unit))])
}

fn currency(rng: &mut ChaCha8Rng, split: Split) -> Drawn {
    let from = rng.gen_range(0..CURRENCIES.len());
    let to = (from + rng.gen_range(1..CURRENCIES.len())) % CURRENCIES.len();
    let (spoken, value) = amount(rng, split);
    let slots =
        vec![("amount", spoken), ("from", currency_name(rng, split, from)), ("to", currency_name(rng, split, to))];
    let args = vec![("amount", value), ("from", json_str(CURRENCIES[from].0)), ("to", json_str(CURRENCIES[to].0))];
    (&CONVERT, slots, "convert_currency", args)
}

fn currency_name(rng: &mut ChaCha8Rng, split: Split, i: usize) -> String {
    let (_, shared, held_out) = CURRENCIES[i];
    let pool = if split == Split::Eval && !held_out.is_empty() && rng.gen_bool(0.5) { held_out } else { shared };
    pick(rng, pool).to_string()
}

/// (as written in the request, as a JSON number)
fn amount(rng: &mut ChaCha8Rng, split: Split) -> (String, String) {
    match rng.gen_range(0..if split == Split::Eval { 5 } else { 4 }) {
        0 => {
            let n = rng.gen_range(1..=5000u32);
            (n.to_string(), n.to_string())
        }
        1 => {
            let cents = rng.gen_range(100..100_000u32);
            let json = format!("{}.{:02}", cents / 100, cents % 100);
            let json = json.trim_end_matches('0').trim_end_matches('.').to_string();
            (format!("{}.{:02}", cents / 100, cents % 100), json)
        }
        2 => {
            let n = 10 * rng.gen_range(1..=50u32);
            (number(rng, n, 0.8), n.to_string())
        }
        3 => {
            let n = rng.gen_range(1_000..=20_000u32);
            (format!("{},{:03}", n / 1000, n % 1000), n.to_string())
        }
        // Held out: thousands written as "2k".
        _ => {
            let k = rng.gen_range(1..=9u32);
            (format!("{k}k"), (k * 1000).to_string())
        }
    }
}

fn event(rng: &mut ChaCha8Rng, split: Split) -> Drawn {
    let title = *TITLES.pick(rng, split);
    let date = Date::random(rng, 2025..=2026);
    let hour = rng.gen_range(7..=21u32);
    let minute = *pick(rng, &[0u32, 0, 15, 30, 45]);
    let slots = vec![
        ("title", title.to_string()),
        ("date", date.spoken(rng, split)),
        ("time", time_text(rng, split, hour, minute)),
    ];
    let args = vec![
        ("title", json_str(title)),
        ("date", json_str(&date.iso())),
        ("time", json_str(&format!("{hour:02}:{minute:02}"))),
    ];
    (&EVENT, slots, "create_event", args)
}

fn time_text(rng: &mut ChaCha8Rng, split: Split, hour: u32, minute: u32) -> String {
    let h12 = if hour > 12 { hour - 12 } else { hour };
    let ampm = if hour >= 12 { "pm" } else { "am" };
    let held = split == Split::Eval && rng.gen_bool(0.4);
    match (held, minute) {
        (true, 0) if hour == 12 => "noon".to_string(),
        (true, 30) => format!("half past {h12} {ampm}"),
        (true, 15) => format!("quarter past {h12} {ampm}"),
        (true, _) => format!("{h12}.{minute:02} {}", ampm.to_uppercase()),
        (false, 0) => match rng.gen_range(0..3) {
            0 => format!("{hour:02}:00"),
            1 => format!("{h12}{ampm}"),
            _ => format!("{h12} {}", ampm.to_uppercase()),
        },
        (false, _) if rng.gen_bool(0.5) => format!("{hour:02}:{minute:02}"),
        (false, _) => format!("{h12}:{minute:02}{ampm}"),
    }
}

fn timer(rng: &mut ChaCha8Rng, split: Split) -> Drawn {
    let (text, minutes) = duration(rng, split);
    (&TIMER, vec![("dur", text)], "set_timer", vec![("minutes", minutes.to_string())])
}

/// (as written, whole minutes)
fn duration(rng: &mut ChaCha8Rng, split: Split) -> (String, u32) {
    let held = split == Split::Eval && rng.gen_bool(0.4);
    if held {
        let h = rng.gen_range(1..=4u32);
        return match rng.gen_range(0..3) {
            0 => (format!("{h}.5 hours"), h * 60 + 30),
            1 => ("an hour and a half".to_string(), 90),
            _ => {
                let m = rng.gen_range(2..=90u32);
                (format!("{m} mins"), m)
            }
        };
    }
    match rng.gen_range(0..6) {
        0 | 1 => {
            let m = rng.gen_range(1..=120u32);
            (format!("{m} minutes"), m)
        }
        2 => {
            let m = rng.gen_range(1..=60u32);
            (format!("{} minutes", number_words(m)), m)
        }
        3 => {
            let h = rng.gen_range(1..=5u32);
            let unit = if h == 1 { "hour" } else { "hours" };
            (format!("{} {unit}", number(rng, h, 0.4)), h * 60)
        }
        4 => {
            let (h, m) = (rng.gen_range(1..=3u32), rng.gen_range(1..=59u32));
            let unit = if h == 1 { "hour" } else { "hours" };
            (format!("{h} {unit} and {m} minutes"), h * 60 + m)
        }
        _ => match rng.gen_range(0..3) {
            0 => ("half an hour".to_string(), 30),
            1 => ("an hour".to_string(), 60),
            _ => {
                let m = rng.gen_range(1..=90u32);
                (format!("{m} min"), m)
            }
        },
    }
}

fn flights(rng: &mut ChaCha8Rng, split: Split) -> Drawn {
    let origin = airport(rng, split);
    let destination = loop {
        let d = airport(rng, split);
        if d != origin {
            break d;
        }
    };
    let date = Date::random(rng, 2025..=2026);
    let spoken = |rng: &mut ChaCha8Rng, (city, code): (&str, &str)| {
        if rng.gen_bool(0.3) {
            code.to_string()
        } else {
            city.to_string()
        }
    };
    let slots = vec![
        ("origin", spoken(rng, origin)),
        ("destination", spoken(rng, destination)),
        ("date", date.spoken(rng, split)),
    ];
    let args =
        vec![("origin", json_str(origin.1)), ("destination", json_str(destination.1)), ("date", json_str(&date.iso()))];
    (&FLIGHTS, slots, "search_flights", args)
}

/// Eval-only airports: every fifth in the table (listed in the system message, but never
/// seen in a training request).
fn airport(rng: &mut ChaCha8Rng, split: Split) -> (&'static str, &'static str) {
    let want_held = split == Split::Eval && rng.gen_bool(0.5);
    let candidates: Vec<usize> = (0..AIRPORTS.len()).filter(|i| (i % 5 == 4) == want_held).collect();
    AIRPORTS[*pick(rng, &candidates)]
}
