//! Domain B: a customer-support message -> `{"category": C, "priority": P}`.
//!
//! A message is an optional greeting, the issue (a question for `low`, a problem for `medium`
//! and `high`, an emergency or a problem plus a legal threat for `urgent`), an optional
//! detail, the priority cue, and an optional sign-off. Categories and priorities are drawn
//! uniformly, so both are balanced.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::text::{dress, json_str, number, pick, Date, Noise, Pool};
use super::Split;

/// Category names, in the order of the per-category tables below.
pub const CATEGORIES: [&str; 5] = ["billing", "shipping", "technical", "account", "refund"];
/// Priority names, lowest first.
pub const PRIORITIES: [&str; 4] = ["low", "medium", "high", "urgent"];

const NOISE: Noise = Noise { typo: 0.1, lowercase: 0.08, politeness: 0.0 };

type P = Pool<&'static str>;

static QUESTIONS: [P; 5] = [
    P {
        shared: &[
            "Can I get a copy of my invoice for order {order}?",
            "Do you accept PayPal?",
            "Which payment methods do you take?",
            "Is it possible to pay by bank transfer?",
            "How do I download my invoices?",
        ],
        held_out: &["Can invoices be addressed to my company?", "Do you offer payment in instalments?"],
    },
    P {
        shared: &[
            "How long does delivery usually take to {country}?",
            "Do you ship to {country}?",
            "Can I change the delivery address for order {order} before it ships?",
            "Which courier do you use?",
            "Is express delivery available?",
        ],
        held_out: &["Can I pick up my order from a store instead?", "Do you deliver on Saturdays?"],
    },
    P {
        shared: &[
            "Is there a dark mode in the app?",
            "Which browsers does your website support?",
            "Does the app work on older Android phones?",
            "Is there a way to turn off the app notifications?",
        ],
        held_out: &["Do you have an app for tablets?", "Will the app get an offline mode?"],
    },
    P {
        shared: &[
            "How do I change my password?",
            "Can I change my username?",
            "How do I update the email address on my account?",
            "Is it possible to have two accounts with one email?",
        ],
        held_out: &["Where do I find my account settings?", "Can I add a second contact person to my profile?"],
    },
    P {
        shared: &[
            "What is your return policy?",
            "How long does a refund take to show up?",
            "Can I return a {product} I bought on sale?",
            "Do I have to pay for return shipping?",
        ],
        held_out: &["Is there a deadline for returning an item?", "Can I get store credit instead of a refund?"],
    },
];

static PROBLEMS: [P; 5] = [
    P {
        shared: &[
            "I was charged twice for order {order}.",
            "My invoice for order {order} shows the wrong amount.",
            "My card was declined but I still see a pending charge of {amount}.",
            "I can't update the credit card on file.",
            "The invoice I received doesn't include VAT.",
            "You billed me {amount} instead of the price shown at checkout.",
        ],
        held_out: &[
            "I was billed {amount} for a plan I downgraded last month.",
            "My payment method keeps getting rejected.",
        ],
    },
    P {
        shared: &[
            "My order {order} still hasn't arrived.",
            "The tracking number for order {order} doesn't work.",
            "My parcel arrived damaged.",
            "The package was delivered to the wrong address.",
            "Tracking says delivered but there's nothing at my door.",
            "Order {order} has been stuck in transit for {days} days.",
        ],
        held_out: &[
            "The box for order {order} was crushed and the {product} inside is broken.",
            "The courier says my address can't be found.",
        ],
    },
    P {
        shared: &[
            "The app crashes every time I open my cart.",
            "I get an error 500 when I try to check out.",
            "The website won't load the product pages.",
            "The search bar returns no results at all.",
            "The app freezes on the payment screen.",
            "Images don't show up on the site.",
        ],
        held_out: &[
            "Your checkout page goes blank after I click pay.",
            "The iPhone app shows an 'unexpected error' when I add a {product} to the basket.",
        ],
    },
    P {
        shared: &[
            "I can't log in to my account.",
            "The password reset email never arrives.",
            "I want to change the email address on my profile but the form fails.",
            "Please delete my account and all my data.",
            "My account got locked after a few login attempts.",
            "I can't change my phone number in my profile.",
        ],
        held_out: &["Two-factor codes don't reach my phone so I can't sign in.", "I'd like to merge my two accounts."],
    },
    P {
        shared: &[
            "I returned the {product} two weeks ago but haven't got my money back.",
            "I want a refund for order {order}.",
            "You approved my refund but the money never showed up.",
            "I'd like to return the {product}, it isn't what I expected.",
            "The refund I received was {amount} short.",
        ],
        held_out: &[
            "I sent back order {order} and I'm still waiting on the reimbursement.",
            "Can I get my money back for the {product}? It stopped working after a day.",
        ],
    },
];

/// Emergencies that make a message urgent on their own; shipping and refund have none (their
/// urgent messages are a problem plus a legal threat or money-lost-now cue).
static EMERGENCIES: [P; 5] = [
    P {
        shared: &[
            "Someone is making charges on my card through your site right now!",
            "I'm being charged {amount} over and over, {n} times in the last hour.",
            "Money is being taken from my account as we speak - {amount} gone already.",
            "There are {n} charges I never made appearing on my statement right now.",
        ],
        held_out: &["My bank just flagged {n} fraudulent payments to your company in the last few minutes."],
    },
    P { shared: &[], held_out: &[] },
    P {
        shared: &[
            "Your whole website is down, nobody can place orders.",
            "The checkout is showing me other customers' card details!",
            "The app shows me someone else's account data.",
            "Your site has been down for an hour and I can't pay for anything.",
        ],
        held_out: &[
            "The site and the app are both offline for everyone I know.",
            "Your login page is leaking other people's email addresses.",
        ],
    },
    P {
        shared: &[
            "Someone hacked my account and changed my password.",
            "I just got a login alert from another country and it wasn't me.",
            "My account was taken over and someone is placing orders with my saved card.",
            "Someone changed the email on my account without my permission.",
        ],
        held_out: &["A stranger is logged in to my account right now and I can't kick them out."],
    },
    P { shared: &[], held_out: &[] },
];

static LOW_CUES: P = P {
    shared: &[
        "No rush at all.",
        "Just curious.",
        "Whenever you have a moment.",
        "Not urgent, just wondering.",
        "It's only a quick question.",
    ],
    held_out: &["Take your time.", "No hurry on this one."],
};
static MEDIUM_CUES: P = P {
    shared: &[
        "Could you look into it?",
        "Can you help?",
        "Please advise.",
        "What should I do?",
        "Can you check what happened?",
    ],
    held_out: &["Let me know what you find.", "Would appreciate a hand with this."],
};
static HIGH_CUES: P = P {
    shared: &[
        "This is the third time I'm contacting you about this!",
        "I'm really frustrated.",
        "I can't do anything until this is fixed.",
        "Nobody has answered my last two emails.",
        "This is unacceptable, I need it sorted today.",
        "I've been waiting for {days} days and I'm fed up.",
    ],
    held_out: &[
        "Honestly I'm furious at this point.",
        "I'm completely stuck and can't work.",
        "Still no reply after {days} days of waiting!",
    ],
};
static URGENT_CUES: P = P {
    shared: &[
        "If this isn't fixed today I'm contacting my lawyer.",
        "I will be taking legal action.",
        "I'm losing money every minute this goes on!",
        "Fix this immediately or I'm reporting you to consumer protection and my lawyer.",
    ],
    held_out: &[
        "My solicitor will be in touch if this isn't resolved at once.",
        "I'm filing a lawsuit unless this is resolved right now.",
    ],
};
static OPENERS: P = P {
    shared: &["Hi,", "Hello,", "Hi team,", "Hey,", "Good afternoon,", "Dear support,"],
    held_out: &["Hello there,", "To whom it may concern,"],
};
static CLOSINGS: P = P {
    shared: &["Thanks.", "Thank you!", "Regards, {name}", "Cheers, {name}", "Best, {name}"],
    held_out: &["Many thanks, {name}", "- {name}"],
};
static DETAILS: P = P {
    shared: &[
        "I ordered on {date}.",
        "My order number is {order}.",
        "I'm using the {platform}.",
        "I've been a customer for years.",
    ],
    held_out: &["This started on {date}.", "I'm writing from the {platform}."],
};

const PRODUCTS: &[&str] = &["headphones", "blender", "jacket", "kettle", "yoga mat", "desk lamp", "sneakers", "tablet"];
const COUNTRIES: &[&str] = &["Canada", "Germany", "Japan", "Spain", "Australia", "Brazil", "Norway", "Ireland"];
const NAMES: &[&str] = &["Anna", "Tom", "Priya", "Lukas", "Sofia", "Ken", "Marta", "James", "Aisha", "Pierre"];
const PLATFORMS: &[&str] = &["iPhone app", "Android app", "website on Chrome", "website on Firefox", "desktop site"];

/// One (message, gold JSON) pair.
pub(crate) fn sample(rng: &mut ChaCha8Rng, split: Split) -> (String, String) {
    let c = rng.gen_range(0..CATEGORIES.len());
    let p = rng.gen_range(0..PRIORITIES.len());
    let mut parts: Vec<&str> = Vec::new();
    if rng.gen_bool(0.5) {
        parts.push(OPENERS.pick(rng, split));
    }
    let has_emergency = !EMERGENCIES[c].shared.is_empty();
    let (issue, cue) = match p {
        0 => (QUESTIONS[c].pick(rng, split), rng.gen_bool(0.6).then(|| LOW_CUES.pick(rng, split))),
        1 => (PROBLEMS[c].pick(rng, split), rng.gen_bool(0.5).then(|| MEDIUM_CUES.pick(rng, split))),
        2 => (PROBLEMS[c].pick(rng, split), Some(HIGH_CUES.pick(rng, split))),
        _ if has_emergency && rng.gen_bool(0.7) => {
            (EMERGENCIES[c].pick(rng, split), rng.gen_bool(0.3).then(|| URGENT_CUES.pick(rng, split)))
        }
        _ => (PROBLEMS[c].pick(rng, split), Some(URGENT_CUES.pick(rng, split))),
    };
    parts.push(issue);
    // Details stay off questions, where an order date would read like a complaint.
    if p > 0 && rng.gen_bool(0.3) {
        parts.push(DETAILS.pick(rng, split));
    }
    parts.extend(cue);
    if rng.gen_bool(0.4) {
        parts.push(CLOSINGS.pick(rng, split));
    }
    let template = parts.join(" ");
    let slots = slots(rng, split);
    let message = dress(rng, split, &template, &slots, &NOISE);
    let gold = format!("{{\"category\": {}, \"priority\": {}}}", json_str(CATEGORIES[c]), json_str(PRIORITIES[p]));
    (message, gold)
}

fn slots(rng: &mut ChaCha8Rng, split: Split) -> Vec<(&'static str, String)> {
    let id: u32 = rng.gen_range(10_000..999_999);
    let order = match rng.gen_range(0..3) {
        0 => format!("#{id}"),
        1 => format!("no. {id}"),
        _ => id.to_string(),
    };
    let cents: u32 = rng.gen_range(500..50_000);
    let currency = *pick(rng, &["$", "€", "£"]);
    let amount = format!("{currency}{}.{:02}", cents / 100, cents % 100);
    let days = rng.gen_range(3..=21);
    let n = rng.gen_range(2..=9);
    vec![
        ("order", order),
        ("amount", amount),
        ("days", number(rng, days, 0.4)),
        ("n", number(rng, n, 0.5)),
        ("product", pick(rng, PRODUCTS).to_string()),
        ("country", pick(rng, COUNTRIES).to_string()),
        ("name", pick(rng, NAMES).to_string()),
        ("platform", pick(rng, PLATFORMS).to_string()),
        ("date", Date::random(rng, 2024..=2025).spoken(rng, split)),
    ]
}
