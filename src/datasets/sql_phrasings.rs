//! Domain A's phrasings and spoken values. `shared` ones appear in both splits, `held_out` ones
//! only in eval, so eval measures whether the model understood the question, not the string.

use super::text::Pool;

type P = Pool<&'static str>;

pub(crate) static US: P = P { shared: &["the United States", "the US", "the USA"], held_out: &["America"] };
pub(crate) static UK: P = P { shared: &["the UK", "the United Kingdom"], held_out: &["Britain"] };
pub(crate) static NL: P = P { shared: &["the Netherlands"], held_out: &["Holland"] };

/// Spoken forms of each status, in `STATUSES` order.
pub(crate) static STATUS_WORDS: [P; 4] = [
    P { shared: &["pending", "still pending", "awaiting shipment"], held_out: &["not shipped yet"] },
    P { shared: &["shipped", "in transit"], held_out: &["on their way"] },
    P { shared: &["delivered", "already delivered"], held_out: &["completed"] },
    P { shared: &["cancelled", "canceled"], held_out: &["called off"] },
];

pub(crate) static PRICES: Pool<u32> =
    Pool { shared: &[10, 15, 20, 25, 30, 40, 50, 75, 100, 150, 200, 300], held_out: &[35, 60, 80, 120, 250] };
pub(crate) static LIMITS: Pool<u32> = Pool { shared: &[2, 3, 5, 6, 8, 10], held_out: &[4, 7] };

pub(crate) static AFTER: P = P { shared: &["after"], held_out: &["later than"] };
pub(crate) static BEFORE: P = P { shared: &["before"], held_out: &["earlier than"] };

/// (things, grouping column, table) for the per-group counts.
pub(crate) const GROUPS: &[(&str, &str, &str)] = &[
    ("products", "category", "products"),
    ("customers", "country", "customers"),
    ("customers", "city", "customers"),
    ("orders", "status", "orders"),
];

pub(crate) static COUNT_CITY: P = P {
    shared: &[
        "How many customers are in {city}?",
        "How many customers do we have in {city}?",
        "Count the customers located in {city}.",
        "Number of customers from {city}?",
        "what's the customer count for {city}",
    ],
    held_out: &["How many of our customers live in {city}?", "Give me the total number of customers based in {city}."],
};

pub(crate) static COUNT_COUNTRY: P = P {
    shared: &[
        "How many customers are from {country}?",
        "How many customers do we have in {country}?",
        "Count customers whose country is {country}.",
        "Number of customers in {country}?",
    ],
    held_out: &["What's the total number of customers living in {country}?", "{country}: how many customers?"],
};

pub(crate) static NAMES_CITY: P = P {
    shared: &[
        "List the names of customers in {city}.",
        "Which customers are from {city}?",
        "Show me all customer names in {city}",
        "Who are our customers in {city}?",
    ],
    held_out: &["Names of everyone who lives in {city}, please.", "I need the customer names for {city}."],
};

pub(crate) static SIGNUPS_YEAR: P = P {
    shared: &[
        "How many customers signed up in {year}?",
        "Count the customers who joined in {year}.",
        "Number of signups during {year}?",
        "How many new customers did we get in {year}?",
    ],
    held_out: &["How many people registered in {year}?", "In {year}, how many customers signed up?"],
};

pub(crate) static SIGNUPS_AFTER: P = P {
    shared: &[
        "Which customers signed up after {date}?",
        "List customers who joined after {date}.",
        "Show the names of customers registered after {date}",
    ],
    held_out: &["Who signed up later than {date}?", "Customer names with a signup date after {date}?"],
};

pub(crate) static ORDERS_STATUS: P = P {
    shared: &[
        "How many orders are {status}?",
        "How many orders are currently {status}?",
        "Count the orders that are {status}.",
        "What is the number of orders which are {status}?",
    ],
    held_out: &["Tell me how many orders are {status} right now.", "Orders that are {status}: how many?"],
};

pub(crate) static ORDERS_PERIOD: P = P {
    shared: &[
        "How many orders were placed in {period}?",
        "Count the orders from {period}.",
        "Number of orders during {period}?",
        "How many orders did we get in {period}?",
    ],
    held_out: &["What was the order count for {period}?", "Orders placed in {period} - how many?"],
};

pub(crate) static ORDERS_BEFORE_AFTER: P = P {
    shared: &[
        "How many orders were placed {rel} {date}?",
        "Count the orders made {rel} {date}.",
        "Number of orders {rel} {date}?",
    ],
    held_out: &["How many orders came in {rel} {date}?"],
};

pub(crate) static PRODUCTS_CATEGORY: P = P {
    shared: &[
        "List all products in the {category} category.",
        "Which products are in {category}?",
        "Show me the {category} products.",
        "What do we sell in {category}?",
    ],
    held_out: &["Give me every product from the {category} category.", "Product names under {category}?"],
};

pub(crate) static PRICE_ABOVE: P = P {
    shared: &[
        "Which products cost more than {price}?",
        "List products priced over {price}.",
        "Show me products with a price above {price}",
        "Products that cost more than {price}?",
    ],
    held_out: &[
        "What do we sell that is pricier than {price}?",
        "Anything priced higher than {price}? List the names.",
    ],
};

pub(crate) static PRICE_BELOW: P = P {
    shared: &[
        "Which products cost less than {price}?",
        "List products priced under {price}.",
        "Show me products with a price below {price}",
        "Products that cost less than {price}?",
    ],
    held_out: &["What do we sell that is cheaper than {price}?", "Anything priced lower than {price}? List the names."],
};

pub(crate) static CATEGORY_BELOW: P = P {
    shared: &[
        "Which {category} products cost less than {price}?",
        "List {category} items under {price}.",
        "Show {category} products cheaper than {price}",
    ],
    held_out: &["Any {category} stuff below {price}?", "In {category}, what costs less than {price}?"],
};

pub(crate) static AVG_PRICE_CATEGORY: P = P {
    shared: &[
        "What is the average price of {category} products?",
        "Average price in the {category} category?",
        "How much does a {category} product cost on average?",
    ],
    held_out: &["Mean price for {category}?", "On average, what do {category} products cost?"],
};

pub(crate) static TOP_EXPENSIVE: P = P {
    shared: &[
        "What are the {n} most expensive products?",
        "List the top {n} products by price.",
        "Show the {n} priciest products.",
    ],
    held_out: &["Which {n} products have the highest prices?"],
};

pub(crate) static CHEAPEST_IN_CATEGORY: P = P {
    shared: &[
        "What are the {n} cheapest {category} products?",
        "List the {n} lowest priced products in {category}.",
        "Show the {n} least expensive items in the {category} category.",
    ],
    held_out: &["In {category}, which {n} products cost the least?"],
};

pub(crate) static COUNT_PER_GROUP: P = P {
    shared: &[
        "How many {things} are there per {group}?",
        "Count {things} by {group}.",
        "Show the number of {things} for each {group}.",
        "{things} per {group}: give me the counts",
    ],
    held_out: &["Break down the number of {things} by {group}.", "For every {group}, how many {things}?"],
};

pub(crate) static AVG_PRICE_PER_CATEGORY: P = P {
    shared: &[
        "What is the average price per category?",
        "Average product price by category?",
        "Show the mean price of products in each category.",
    ],
    held_out: &["For each category, what's the average price?"],
};

pub(crate) static DISTINCT_COUNTRIES: P = P {
    shared: &["What countries are our customers from?", "List the distinct countries of our customers."],
    held_out: &["Which countries do we have customers in?"],
};

pub(crate) static DISTINCT_CATEGORIES: P = P {
    shared: &["Which product categories do we have?", "List all the distinct product categories."],
    held_out: &["What categories of products do we sell?"],
};

pub(crate) static DISTINCT_CITIES: P = P {
    shared: &[
        "Which cities in {country} do we have customers in?",
        "List the different cities our customers in {country} live in.",
        "What cities are our {country} customers from?",
    ],
    held_out: &["In what cities of {country} are our customers?"],
};

pub(crate) static ORDERS_OF_CUSTOMER: P = P {
    shared: &[
        "How many orders has {name} placed?",
        "Count the orders made by {name}.",
        "Number of orders from customer {name}?",
        "How many times has {name} ordered?",
    ],
    held_out: &["{name} - how many orders so far?", "What's the order count for {name}?"],
};

pub(crate) static ORDERS_CITY_STATUS: P = P {
    shared: &[
        "How many orders from customers in {city} are {status}?",
        "Count orders placed by {city} customers that are {status}.",
        "Number of {city} orders that are {status}?",
    ],
    held_out: &["For customers living in {city}, how many orders are {status}?"],
};

pub(crate) static ORDERS_COUNTRY: P = P {
    shared: &[
        "How many orders came from customers in {country}?",
        "Count orders from {country}.",
        "Number of orders placed by customers from {country}?",
    ],
    held_out: &["What's the total number of orders from {country}?"],
};

pub(crate) static UNITS_SOLD_PRODUCT: P = P {
    shared: &[
        "How many units of {product} have been sold?",
        "Total quantity sold of {product}?",
        "How many {product} units did we sell?",
    ],
    held_out: &["What's the total number of {product} units ordered?"],
};

pub(crate) static REVENUE_PER_CATEGORY: P = P {
    shared: &[
        "What is the total revenue per category?",
        "Show revenue by product category.",
        "How much money did each category bring in?",
    ],
    held_out: &["Break down total sales revenue by category."],
};

pub(crate) static REVENUE_STATUS: P = P {
    shared: &[
        "What's the total value of orders that are {status}?",
        "How much revenue comes from orders that are {status}?",
        "Total amount of the orders that are {status}?",
    ],
    held_out: &["Sum up the sales value of orders that are {status}."],
};

pub(crate) static TOP_PRODUCTS_UNITS: P = P {
    shared: &[
        "What are the {n} best-selling products, with units sold?",
        "Top {n} products by quantity sold, and how many units each?",
        "List the {n} products with the most units sold and their totals.",
    ],
    held_out: &["Which {n} products sold the most units? Include the unit counts."],
};

pub(crate) static TOP_CUSTOMERS_SPEND: P = P {
    shared: &[
        "Who are the top {n} customers by total spending, and how much did they spend?",
        "List the {n} customers who spent the most, with their totals.",
        "Top {n} spenders and their total spend?",
    ],
    held_out: &["Which {n} customers have spent the most money? Show the amounts."],
};

pub(crate) static CUSTOMERS_BOUGHT_PRODUCT: P = P {
    shared: &[
        "Which customers bought {product}?",
        "List the names of customers who ordered {product}.",
        "Who has purchased {product}?",
    ],
    held_out: &["Show everyone who ordered a {product}."],
};
