//! The shop that domain A's questions are about: value pools and the seeded SQLite database
//! that both the generator (to check its gold queries) and the scorer (`eval::sql`) run on.
//!
//! Shape: 200 customers, 120 products (distinct prices, so price rankings have no ties),
//! 500 orders dated 2022-2025, about 1,250 order items.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rusqlite::{params, Connection};

use super::text::{pick, Date};

/// The schema, as the system message and the database both state it.
pub const SCHEMA: &str =
    "CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT, country TEXT, signup_date TEXT);
CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT, category TEXT, price REAL);
CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER, order_date TEXT, status TEXT);
CREATE TABLE order_items (order_id INTEGER, product_id INTEGER, quantity INTEGER);";

/// (city, country) pairs customers live in.
pub const CITIES: &[(&str, &str)] = &[
    ("Paris", "France"),
    ("Lyon", "France"),
    ("Marseille", "France"),
    ("Berlin", "Germany"),
    ("Munich", "Germany"),
    ("Hamburg", "Germany"),
    ("Madrid", "Spain"),
    ("Barcelona", "Spain"),
    ("Seville", "Spain"),
    ("Rome", "Italy"),
    ("Milan", "Italy"),
    ("London", "United Kingdom"),
    ("Manchester", "United Kingdom"),
    ("Dublin", "Ireland"),
    ("Amsterdam", "Netherlands"),
    ("Rotterdam", "Netherlands"),
    ("Lisbon", "Portugal"),
    ("Porto", "Portugal"),
    ("Vienna", "Austria"),
    ("Warsaw", "Poland"),
    ("Stockholm", "Sweden"),
    ("Oslo", "Norway"),
    ("New York", "United States"),
    ("Chicago", "United States"),
    ("Austin", "United States"),
    ("Toronto", "Canada"),
    ("Vancouver", "Canada"),
    ("Sydney", "Australia"),
    ("Melbourne", "Australia"),
    ("Tokyo", "Japan"),
];

/// Product categories.
pub const CATEGORIES: &[&str] =
    &["Books", "Electronics", "Toys", "Garden", "Kitchen", "Sports", "Clothing", "Beauty", "Music", "Office"];

/// Order statuses.
pub const STATUSES: &[&str] = &["pending", "shipped", "delivered", "cancelled"];

const FIRST_NAMES: &[&str] = &[
    "Alice", "Bruno", "Chloe", "Daniel", "Emma", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Keiko", "Liam", "Maya",
    "Nikolai", "Olivia", "Pablo", "Quinn", "Rosa", "Samir", "Tara", "Umar", "Vera", "Wei", "Ximena", "Yusuf", "Zoe",
];
const LAST_NAMES: &[&str] = &[
    "Andersen", "Bauer", "Costa", "Dubois", "Evans", "Fischer", "Garcia", "Horvat", "Ito", "Jansen", "Kowalski",
    "Lopez", "Moreau", "Nakamura", "Olsen", "Petrov", "Rossi", "Schmidt", "Tanaka", "Novak", "Walsh", "Young",
];
const ADJECTIVES: &[&str] =
    &["Classic", "Deluxe", "Compact", "Smart", "Eco", "Pro", "Mini", "Ultra", "Vintage", "Premium", "Travel", "Family"];
/// Nouns per category, in `CATEGORIES` order.
const NOUNS: &[&[&str]] = &[
    &["Novel", "Cookbook", "Atlas", "Journal", "Comic"],
    &["Headphones", "Speaker", "Tablet", "Charger", "Camera"],
    &["Puzzle", "Robot", "Kite", "Doll", "Board Game"],
    &["Hose", "Planter", "Shovel", "Lantern", "Bird Feeder"],
    &["Blender", "Kettle", "Knife Set", "Toaster", "Pan"],
    &["Yoga Mat", "Football", "Racket", "Dumbbells", "Helmet"],
    &["Jacket", "Scarf", "Sneakers", "Hoodie", "Raincoat"],
    &["Face Cream", "Perfume", "Hair Dryer", "Lip Balm", "Shampoo"],
    &["Guitar", "Ukulele", "Vinyl Record", "Keyboard", "Drum Pad"],
    &["Notebook", "Desk Lamp", "Stapler", "Backpack", "Pen Set"],
];

/// A customer row.
pub struct Customer {
    pub id: i64,
    pub name: String,
    pub city: &'static str,
    pub country: &'static str,
    pub signup_date: String,
}

/// A product row.
pub struct Product {
    pub id: i64,
    pub name: String,
    pub category: &'static str,
    pub price: f64,
}

/// The shop's rows, generated from a fixed seed.
pub struct Shop {
    pub customers: Vec<Customer>,
    pub products: Vec<Product>,
    /// (id, customer_id, order_date, status)
    pub orders: Vec<(i64, i64, String, &'static str)>,
    /// (order_id, product_id, quantity)
    pub items: Vec<(i64, i64, i64)>,
}

const SHOP_SEED: u64 = 0x5107_0001;

impl Shop {
    /// The one shop every question and every score refers to.
    pub fn generate() -> Shop {
        let mut rng = ChaCha8Rng::seed_from_u64(SHOP_SEED);
        let customers = customers(&mut rng);
        let products = products(&mut rng);
        let mut orders = Vec::new();
        let mut items = Vec::new();
        for id in 1..=500 {
            let customer = pick(&mut rng, &customers).id;
            let date = Date::random(&mut rng, 2022..=2025).iso();
            let status = match rng.gen_range(0..20) {
                0..=9 => "delivered",
                10..=13 => "shipped",
                14..=16 => "pending",
                _ => "cancelled",
            };
            orders.push((id, customer, date, status));
            let lines = rng.gen_range(1..=4);
            let mut used = Vec::new();
            while used.len() < lines {
                let product = pick(&mut rng, &products).id;
                if !used.contains(&product) {
                    used.push(product);
                    items.push((id, product, rng.gen_range(1..=5)));
                }
            }
        }
        Shop { customers, products, orders, items }
    }
}

fn customers(rng: &mut ChaCha8Rng) -> Vec<Customer> {
    let mut out: Vec<Customer> = Vec::new();
    while out.len() < 200 {
        let name = format!("{} {}", pick(rng, FIRST_NAMES), pick(rng, LAST_NAMES));
        if out.iter().any(|c| c.name == name) {
            continue;
        }
        let (city, country) = *pick(rng, CITIES);
        let signup_date = Date::random(rng, 2022..=2024).iso();
        out.push(Customer { id: out.len() as i64 + 1, name, city, country, signup_date });
    }
    out
}

fn products(rng: &mut ChaCha8Rng) -> Vec<Product> {
    let mut out: Vec<Product> = Vec::new();
    while out.len() < 120 {
        let c = rng.gen_range(0..CATEGORIES.len());
        let name = format!("{} {}", pick(rng, ADJECTIVES), pick(rng, NOUNS[c]));
        // Whole cents, distinct across the shop so that ORDER BY price never ties.
        let price = f64::from(rng.gen_range(199u32..=49_999)) / 100.0;
        if out.iter().any(|p| p.name == name || p.price == price) {
            continue;
        }
        out.push(Product { id: out.len() as i64 + 1, name, category: CATEGORIES[c], price });
    }
    out
}

/// The seeded shop as an in-memory SQLite database, set to `query_only` so that nothing run on
/// it later can change it.
pub fn shop_database() -> Result<Connection, rusqlite::Error> {
    let shop = Shop::generate();
    let mut conn = Connection::open_in_memory()?;
    conn.execute_batch(SCHEMA)?;
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare("INSERT INTO customers VALUES (?1, ?2, ?3, ?4, ?5)")?;
        for c in &shop.customers {
            stmt.execute(params![c.id, c.name, c.city, c.country, c.signup_date])?;
        }
        let mut stmt = tx.prepare("INSERT INTO products VALUES (?1, ?2, ?3, ?4)")?;
        for p in &shop.products {
            stmt.execute(params![p.id, p.name, p.category, p.price])?;
        }
        let mut stmt = tx.prepare("INSERT INTO orders VALUES (?1, ?2, ?3, ?4)")?;
        for (id, customer, date, status) in &shop.orders {
            stmt.execute(params![id, customer, date, status])?;
        }
        let mut stmt = tx.prepare("INSERT INTO order_items VALUES (?1, ?2, ?3)")?;
        for (order, product, quantity) in &shop.items {
            stmt.execute(params![order, product, quantity])?;
        }
    }
    tx.commit()?;
    conn.execute_batch("PRAGMA query_only = ON;")?;
    Ok(conn)
}
