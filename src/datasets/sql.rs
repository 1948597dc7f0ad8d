//! Domain A: questions about the shop -> one SQLite `SELECT`, in one canonical style
//! (upper-case keywords, one line, `fk_table.fk = pk_table.id` joins, no aliases, no `;`).
//!
//! Each gold query is run on the seeded shop database while generating; a question whose
//! answer is empty, NULL or zero is redrawn, and so is a ranking whose cut-off has a tie (the
//! order would then be arbitrary).

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rusqlite::types::Value;
use rusqlite::Connection;

use super::shop::{shop_database, Shop, CATEGORIES, CITIES, STATUSES};
use super::sql_phrasings as p;
use super::text::{dress, number, pick, Date, Noise, Pool, MONTHS};
use super::{DatasetError, Split};

const NOISE: Noise = Noise { typo: 0.08, lowercase: 0.12, politeness: 0.2 };

/// Join paths, spelled once so every family uses the same canonical text.
const J_ORDERS_CUSTOMERS: &str = "orders JOIN customers ON orders.customer_id = customers.id";
const J_ITEMS_PRODUCTS: &str = "order_items JOIN products ON order_items.product_id = products.id";
const J_CUSTOMERS_ALL: &str = "customers JOIN orders ON orders.customer_id = customers.id JOIN order_items ON order_items.order_id = orders.id JOIN products ON order_items.product_id = products.id";
const REVENUE: &str = "SUM(order_items.quantity * products.price)";

/// One drawn question before noise: its phrasings, slot values and gold SQL.
struct Query {
    phrasings: &'static Pool<&'static str>,
    slots: Vec<(&'static str, String)>,
    sql: String,
    /// The last column is an `ORDER BY ... LIMIT n` key that must not tie at the cut-off.
    ranked: bool,
}

impl Query {
    fn new(phrasings: &'static Pool<&'static str>, slots: Vec<(&'static str, String)>, sql: String) -> Self {
        Query { phrasings, slots, sql, ranked: false }
    }
}

type Family = fn(&Values, &mut ChaCha8Rng, Split) -> Query;

const FAMILIES: &[Family] = &[
    count_city,
    count_country,
    names_city,
    signups_year,
    signups_after,
    orders_status,
    orders_period,
    orders_before_after,
    products_category,
    price_above,
    price_below,
    category_below,
    avg_price_category,
    top_expensive,
    cheapest_in_category,
    count_per_group,
    avg_price_per_category,
    distinct_values,
    orders_of_customer,
    orders_city_status,
    orders_country,
    units_sold_product,
    revenue_per_category,
    revenue_status,
    top_products_units,
    top_customers_spend,
    customers_bought_product,
];

/// Draws questions for domain A, checking each gold query on the shop database.
pub(crate) struct SqlGenerator {
    values: Values,
    conn: Connection,
}

impl SqlGenerator {
    pub fn new() -> Result<Self, DatasetError> {
        Ok(SqlGenerator { values: Values { shop: Shop::generate() }, conn: shop_database()? })
    }

    /// One (question, gold SQL) pair, or `None` when the draw is rejected.
    pub fn sample(&mut self, rng: &mut ChaCha8Rng, split: Split) -> Result<Option<(String, String)>, DatasetError> {
        let family = pick(rng, FAMILIES);
        let query = family(&self.values, rng, split);
        let template = query.phrasings.pick(rng, split);
        let question = dress(rng, split, template, &query.slots, &NOISE);
        if !self.is_informative(&query)? {
            return Ok(None);
        }
        Ok(Some((question, query.sql)))
    }

    fn is_informative(&self, query: &Query) -> Result<bool, DatasetError> {
        let rows = run(&self.conn, &query.sql)?;
        let trivial = match rows.as_slice() {
            [] => true,
            [row] if row.len() == 1 => matches!(row[0], Value::Null | Value::Integer(0)),
            _ => false,
        };
        if trivial {
            return Ok(false);
        }
        if !query.ranked {
            return Ok(true);
        }
        // One row past the cut-off: the key must strictly change between consecutive rows.
        let Some((head, n)) = query.sql.rsplit_once(" LIMIT ") else { return Ok(true) };
        let n: usize = n.parse().map_err(|_| DatasetError::Generation(format!("bad LIMIT in {}", query.sql)))?;
        let extended = run(&self.conn, &format!("{head} LIMIT {}", n + 1))?;
        let keys: Vec<String> = extended.iter().filter_map(|r| r.last()).map(|v| format!("{v:?}")).collect();
        Ok(keys.windows(2).all(|w| w[0] != w[1]))
    }
}

fn run(conn: &Connection, sql: &str) -> Result<Vec<Vec<Value>>, DatasetError> {
    let bad = |e: rusqlite::Error| DatasetError::Generation(format!("gold query failed: {sql}: {e}"));
    let mut stmt = conn.prepare(sql).map_err(bad)?;
    let columns = stmt.column_count();
    let rows = stmt
        .query_map([], |row| (0..columns).map(|i| row.get::<_, Value>(i)).collect::<Result<Vec<_>, _>>())
        .map_err(bad)?;
    rows.collect::<Result<Vec<_>, _>>().map_err(bad)
}

/// Value pools over the shop; eval draws held-out values half the time.
struct Values {
    shop: Shop,
}

/// Train uses indices where `held_out(i)` is false; eval uses held-out ones half the time.
fn split_index(rng: &mut ChaCha8Rng, split: Split, len: usize, held_out: impl Fn(usize) -> bool) -> usize {
    let want_held = split == Split::Eval && rng.gen_bool(0.5);
    let candidates: Vec<usize> = (0..len).filter(|&i| held_out(i) == want_held).collect();
    *pick(rng, &candidates)
}

impl Values {
    /// (value for the slot, value for the SQL)
    fn city(&self, rng: &mut ChaCha8Rng, split: Split) -> (&'static str, &'static str) {
        CITIES[split_index(rng, split, CITIES.len(), |i| i % 5 == 4)]
    }

    fn country(&self, rng: &mut ChaCha8Rng, split: Split) -> (String, &'static str) {
        let (_, country) = self.city(rng, split);
        let spoken = match country {
            "United States" => *p::US.pick(rng, split),
            "United Kingdom" => *p::UK.pick(rng, split),
            "Netherlands" => *p::NL.pick(rng, split),
            other => other,
        };
        (spoken.to_string(), country)
    }

    fn category(&self, rng: &mut ChaCha8Rng, split: Split) -> (String, &'static str) {
        let category = CATEGORIES[split_index(rng, split, CATEGORIES.len(), |i| i == 3 || i == 8)];
        let spoken = if rng.gen_bool(0.5) { category.to_lowercase() } else { category.to_string() };
        (spoken, category)
    }

    fn status(&self, rng: &mut ChaCha8Rng, split: Split) -> (String, &'static str) {
        let i = rng.gen_range(0..STATUSES.len());
        (p::STATUS_WORDS[i].pick(rng, split).to_string(), STATUSES[i])
    }

    fn price(&self, rng: &mut ChaCha8Rng, split: Split) -> (String, u32) {
        let value = *p::PRICES.pick(rng, split);
        let spoken = match rng.gen_range(0..5) {
            0 => format!("${value}"),
            1 => format!("{} dollars", number(rng, value, 0.3)),
            2 if split == Split::Eval => format!("{value} bucks"),
            _ => value.to_string(),
        };
        (spoken, value)
    }

    fn limit(&self, rng: &mut ChaCha8Rng, split: Split) -> (String, u32) {
        let n = *p::LIMITS.pick(rng, split);
        (number(rng, n, 0.4), n)
    }

    fn customer(&self, rng: &mut ChaCha8Rng, split: Split) -> String {
        let customers = &self.shop.customers;
        customers[split_index(rng, split, customers.len(), |i| i % 4 == 3)].name.clone()
    }

    fn product(&self, rng: &mut ChaCha8Rng, split: Split) -> String {
        let products = &self.shop.products;
        products[split_index(rng, split, products.len(), |i| i % 4 == 3)].name.clone()
    }

    /// (spoken period, first day, last day): a whole year or one month of 2022-2025.
    fn period(&self, rng: &mut ChaCha8Rng, split: Split) -> (String, String, String) {
        let year = rng.gen_range(2022..=2025);
        if rng.gen_bool(0.4) {
            return (year.to_string(), format!("{year}-01-01"), format!("{year}-12-31"));
        }
        let month = rng.gen_range(1..=12u32);
        let name = MONTHS[(month - 1) as usize];
        let spoken = match rng.gen_range(0..if split == Split::Eval { 4 } else { 3 }) {
            0 | 1 => format!("{name} {year}"),
            2 => format!("{year}-{month:02}"),
            _ => format!("{} {year}", &name[..3]),
        };
        let last = super::text::days_in_month(year, month);
        (spoken, format!("{year}-{month:02}-01"), format!("{year}-{month:02}-{last:02}"))
    }
}

fn count_city(v: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let (city, _) = v.city(rng, split);
    let sql = format!("SELECT COUNT(*) FROM customers WHERE city = '{city}'");
    Query::new(&p::COUNT_CITY, vec![("city", city.to_string())], sql)
}

fn count_country(v: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let (spoken, country) = v.country(rng, split);
    let sql = format!("SELECT COUNT(*) FROM customers WHERE country = '{country}'");
    Query::new(&p::COUNT_COUNTRY, vec![("country", spoken)], sql)
}

fn names_city(v: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let (city, _) = v.city(rng, split);
    let sql = format!("SELECT name FROM customers WHERE city = '{city}'");
    Query::new(&p::NAMES_CITY, vec![("city", city.to_string())], sql)
}

fn signups_year(_: &Values, rng: &mut ChaCha8Rng, _: Split) -> Query {
    let year: u32 = rng.gen_range(2022..=2024);
    let sql = format!("SELECT COUNT(*) FROM customers WHERE signup_date BETWEEN '{year}-01-01' AND '{year}-12-31'");
    Query::new(&p::SIGNUPS_YEAR, vec![("year", year.to_string())], sql)
}

fn signups_after(_: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let date = Date::random(rng, 2023..=2024);
    let sql = format!("SELECT name FROM customers WHERE signup_date > '{}'", date.iso());
    Query::new(&p::SIGNUPS_AFTER, vec![("date", date.spoken(rng, split))], sql)
}

fn orders_status(v: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let (spoken, status) = v.status(rng, split);
    let sql = format!("SELECT COUNT(*) FROM orders WHERE status = '{status}'");
    Query::new(&p::ORDERS_STATUS, vec![("status", spoken)], sql)
}

fn orders_period(v: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let (spoken, first, last) = v.period(rng, split);
    let sql = format!("SELECT COUNT(*) FROM orders WHERE order_date BETWEEN '{first}' AND '{last}'");
    Query::new(&p::ORDERS_PERIOD, vec![("period", spoken)], sql)
}

fn orders_before_after(_: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let date = Date::random(rng, 2022..=2025);
    let after = rng.gen_bool(0.5);
    let rel = if after { p::AFTER.pick(rng, split) } else { p::BEFORE.pick(rng, split) };
    let op = if after { ">" } else { "<" };
    let sql = format!("SELECT COUNT(*) FROM orders WHERE order_date {op} '{}'", date.iso());
    Query::new(&p::ORDERS_BEFORE_AFTER, vec![("rel", rel.to_string()), ("date", date.spoken(rng, split))], sql)
}

fn products_category(v: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let (spoken, category) = v.category(rng, split);
    let sql = format!("SELECT name FROM products WHERE category = '{category}'");
    Query::new(&p::PRODUCTS_CATEGORY, vec![("category", spoken)], sql)
}

fn price_above(v: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let (spoken, price) = v.price(rng, split);
    Query::new(&p::PRICE_ABOVE, vec![("price", spoken)], format!("SELECT name FROM products WHERE price > {price}"))
}

fn price_below(v: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let (spoken, price) = v.price(rng, split);
    Query::new(&p::PRICE_BELOW, vec![("price", spoken)], format!("SELECT name FROM products WHERE price < {price}"))
}

fn category_below(v: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let (cat_spoken, category) = v.category(rng, split);
    let (price_spoken, price) = v.price(rng, split);
    let sql = format!("SELECT name FROM products WHERE category = '{category}' AND price < {price}");
    Query::new(&p::CATEGORY_BELOW, vec![("category", cat_spoken), ("price", price_spoken)], sql)
}

fn avg_price_category(v: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let (spoken, category) = v.category(rng, split);
    let sql = format!("SELECT AVG(price) FROM products WHERE category = '{category}'");
    Query::new(&p::AVG_PRICE_CATEGORY, vec![("category", spoken)], sql)
}

fn top_expensive(v: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let (spoken, n) = v.limit(rng, split);
    let sql = format!("SELECT name FROM products ORDER BY price DESC LIMIT {n}");
    Query::new(&p::TOP_EXPENSIVE, vec![("n", spoken)], sql)
}

fn cheapest_in_category(v: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let (n_spoken, n) = v.limit(rng, split);
    let (cat_spoken, category) = v.category(rng, split);
    let sql = format!("SELECT name FROM products WHERE category = '{category}' ORDER BY price LIMIT {n}");
    Query::new(&p::CHEAPEST_IN_CATEGORY, vec![("n", n_spoken), ("category", cat_spoken)], sql)
}

fn count_per_group(_: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let (things, group, table) = *pick(rng, p::GROUPS);
    let sql = format!("SELECT {group}, COUNT(*) FROM {table} GROUP BY {group}");
    let group_word = if group == "city" && split == Split::Eval && rng.gen_bool(0.5) { "town" } else { group };
    Query::new(&p::COUNT_PER_GROUP, vec![("things", things.to_string()), ("group", group_word.to_string())], sql)
}

fn avg_price_per_category(_: &Values, _: &mut ChaCha8Rng, _: Split) -> Query {
    let sql = "SELECT category, AVG(price) FROM products GROUP BY category".to_string();
    Query::new(&p::AVG_PRICE_PER_CATEGORY, vec![], sql)
}

fn distinct_values(v: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    match rng.gen_range(0..4) {
        0 => Query::new(&p::DISTINCT_COUNTRIES, vec![], "SELECT DISTINCT country FROM customers".to_string()),
        1 => Query::new(&p::DISTINCT_CATEGORIES, vec![], "SELECT DISTINCT category FROM products".to_string()),
        _ => {
            let (spoken, country) = v.country(rng, split);
            let sql = format!("SELECT DISTINCT city FROM customers WHERE country = '{country}'");
            Query::new(&p::DISTINCT_CITIES, vec![("country", spoken)], sql)
        }
    }
}

fn orders_of_customer(v: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let name = v.customer(rng, split);
    let sql = format!("SELECT COUNT(*) FROM {J_ORDERS_CUSTOMERS} WHERE customers.name = '{name}'");
    Query::new(&p::ORDERS_OF_CUSTOMER, vec![("name", name)], sql)
}

fn orders_city_status(v: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let (city, _) = v.city(rng, split);
    let (spoken, status) = v.status(rng, split);
    let sql = format!(
        "SELECT COUNT(*) FROM {J_ORDERS_CUSTOMERS} WHERE customers.city = '{city}' AND orders.status = '{status}'"
    );
    Query::new(&p::ORDERS_CITY_STATUS, vec![("city", city.to_string()), ("status", spoken)], sql)
}

fn orders_country(v: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let (spoken, country) = v.country(rng, split);
    let sql = format!("SELECT COUNT(*) FROM {J_ORDERS_CUSTOMERS} WHERE customers.country = '{country}'");
    Query::new(&p::ORDERS_COUNTRY, vec![("country", spoken)], sql)
}

fn units_sold_product(v: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let product = v.product(rng, split);
    let sql = format!("SELECT SUM(order_items.quantity) FROM {J_ITEMS_PRODUCTS} WHERE products.name = '{product}'");
    Query::new(&p::UNITS_SOLD_PRODUCT, vec![("product", product)], sql)
}

fn revenue_per_category(_: &Values, _: &mut ChaCha8Rng, _: Split) -> Query {
    let sql = format!("SELECT products.category, {REVENUE} FROM {J_ITEMS_PRODUCTS} GROUP BY products.category");
    Query::new(&p::REVENUE_PER_CATEGORY, vec![], sql)
}

fn revenue_status(v: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let (spoken, status) = v.status(rng, split);
    let sql = format!(
        "SELECT {REVENUE} FROM {J_ITEMS_PRODUCTS} JOIN orders ON order_items.order_id = orders.id WHERE orders.status = '{status}'"
    );
    Query::new(&p::REVENUE_STATUS, vec![("status", spoken)], sql)
}

fn top_products_units(v: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let (spoken, n) = v.limit(rng, split);
    let sum = "SUM(order_items.quantity)";
    let sql = format!(
        "SELECT products.name, {sum} FROM {J_ITEMS_PRODUCTS} GROUP BY products.name ORDER BY {sum} DESC LIMIT {n}"
    );
    Query { ranked: true, ..Query::new(&p::TOP_PRODUCTS_UNITS, vec![("n", spoken)], sql) }
}

fn top_customers_spend(v: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let (spoken, n) = v.limit(rng, split);
    let sql = format!(
        "SELECT customers.name, {REVENUE} FROM {J_CUSTOMERS_ALL} GROUP BY customers.name ORDER BY {REVENUE} DESC LIMIT {n}"
    );
    Query { ranked: true, ..Query::new(&p::TOP_CUSTOMERS_SPEND, vec![("n", spoken)], sql) }
}

fn customers_bought_product(v: &Values, rng: &mut ChaCha8Rng, split: Split) -> Query {
    let product = v.product(rng, split);
    let sql = format!("SELECT DISTINCT customers.name FROM {J_CUSTOMERS_ALL} WHERE products.name = '{product}'");
    Query::new(&p::CUSTOMERS_BOUGHT_PRODUCT, vec![("product", product)], sql)
}
