//! OpenAI's attribute filters for file search: comparisons of a file's `attributes` with
//! values, combined with `and` and `or`, read from a request's JSON and evaluated per file.
//! Also the limits on the attributes themselves.
//!
//! OpenAI does not say what a comparison does with a key the file lacks, or with a value of
//! another type. Here `ne` is always exactly `not eq` and `nin` exactly `not in`: a missing key
//! or a value of another type is never equal, so `eq`/`in` fail and `ne`/`nin` pass; the
//! ordering comparisons (`gt`, `gte`, `lt`, `lte`) fail. Numbers compare as f64, strings by
//! code point, booleans only for equality.

use std::cmp::Ordering;

use serde_json::{Map, Value};

/// Deepest nesting of `and`/`or` a filter may have, a comparison at the top being depth 1.
const MAX_DEPTH: usize = 8;
/// Most filters, comparisons and compounds together, in one request's filter.
const MAX_NODES: usize = 64;
/// Most keys in a file's `attributes`, as OpenAI allows.
const MAX_ATTRIBUTES: usize = 16;
/// Longest attribute key, in characters, as OpenAI allows.
const MAX_KEY_CHARS: usize = 64;
/// Longest attribute string value, in characters, as OpenAI allows.
const MAX_STRING_CHARS: usize = 512;

/// A parsed filter: which files a search may return.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Filter {
    /// `eq`, `ne`, `gt`, `gte`, `lt`, `lte`: the attribute `key` against one value.
    Compare {
        key: String,
        op: Comparison,
        value: Scalar,
    },
    /// `in`: the attribute `key` equals one of the values.
    In { key: String, values: Vec<Scalar> },
    /// `nin`: the attribute `key` equals none of the values.
    NotIn { key: String, values: Vec<Scalar> },
    /// `and`: every filter passes.
    And(Vec<Filter>),
    /// `or`: at least one filter passes.
    Or(Vec<Filter>),
}

/// How a comparison filter compares the attribute (left) with its value (right).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Comparison {
    Eq,
    Ne,
    Gt,
    Gte,
    Lt,
    Lte,
}

/// A value a filter compares with, of one of the types an attribute may have.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Scalar {
    String(String),
    Number(f64),
    Bool(bool),
}

impl Filter {
    /// Reads a `filters` object. The error is a sentence naming the place at fault by its
    /// path from `filters`, e.g. `filters.filters[1].type must be one of …`.
    pub(crate) fn parse(value: &Value) -> Result<Filter, String> {
        let mut nodes = 0;
        parse_node(value, "filters", 1, &mut nodes)
    }

    /// Whether a file with these `attributes` (a JSON object; anything else counts as no
    /// attributes) passes the filter.
    pub(crate) fn matches(&self, attributes: &Value) -> bool {
        match self {
            Filter::Compare { key, op, value } => compare(attributes.get(key), *op, value),
            Filter::In { key, values } => values.iter().any(|v| equals(attributes.get(key), v)),
            Filter::NotIn { key, values } => !values.iter().any(|v| equals(attributes.get(key), v)),
            Filter::And(filters) => filters.iter().all(|f| f.matches(attributes)),
            Filter::Or(filters) => filters.iter().any(|f| f.matches(attributes)),
        }
    }
}

/// One filter object at `path`, `depth` levels down, counting itself into `nodes`.
fn parse_node(
    value: &Value,
    path: &str,
    depth: usize,
    nodes: &mut usize,
) -> Result<Filter, String> {
    *nodes += 1;
    if *nodes > MAX_NODES {
        return Err(format!(
            "filters may hold at most {MAX_NODES} filters in all"
        ));
    }
    if depth > MAX_DEPTH {
        return Err(format!("{path} is nested deeper than {MAX_DEPTH} levels"));
    }
    let object = value
        .as_object()
        .ok_or_else(|| format!("{path} must be an object"))?;
    let op = match object.get("type").and_then(Value::as_str) {
        Some("and") | Some("or") => return parse_compound(object, path, depth, nodes),
        Some("eq") => Comparison::Eq,
        Some("ne") => Comparison::Ne,
        Some("gt") => Comparison::Gt,
        Some("gte") => Comparison::Gte,
        Some("lt") => Comparison::Lt,
        Some("lte") => Comparison::Lte,
        Some("in") | Some("nin") => return parse_membership(object, path),
        _ => {
            return Err(format!(
                "{path}.type must be one of eq, ne, gt, gte, lt, lte, in, nin, and, or"
            ))
        }
    };
    only_known(object, path, &["type", "key", "value"])?;
    let key = parse_key(object, path)?;
    let value = object
        .get("value")
        .ok_or_else(|| format!("{path}.value is required"))?;
    let value =
        scalar(value).ok_or_else(|| format!("{path}.value must be a string, number or boolean"))?;
    Ok(Filter::Compare { key, op, value })
}

/// `and` or `or` with its list of filters, each parsed one level deeper.
fn parse_compound(
    object: &Map<String, Value>,
    path: &str,
    depth: usize,
    nodes: &mut usize,
) -> Result<Filter, String> {
    only_known(object, path, &["type", "filters"])?;
    let filters = match object.get("filters") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        _ => {
            return Err(format!(
                "{path}.filters must be a non-empty array of filters"
            ))
        }
    };
    let filters = filters
        .iter()
        .enumerate()
        .map(|(i, item)| parse_node(item, &format!("{path}.filters[{i}]"), depth + 1, nodes))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(match object.get("type").and_then(Value::as_str) {
        Some("and") => Filter::And(filters),
        _ => Filter::Or(filters),
    })
}

/// `in` or `nin`, whose value is an array of scalars (an empty one: `in` never passes, `nin`
/// always does).
fn parse_membership(object: &Map<String, Value>, path: &str) -> Result<Filter, String> {
    only_known(object, path, &["type", "key", "value"])?;
    let key = parse_key(object, path)?;
    let not_scalars = || format!("{path}.value must be an array of strings, numbers or booleans");
    let values = match object.get("value") {
        None => return Err(format!("{path}.value is required")),
        Some(Value::Array(items)) => items
            .iter()
            .map(scalar)
            .collect::<Option<Vec<_>>>()
            .ok_or_else(not_scalars)?,
        Some(_) => return Err(not_scalars()),
    };
    Ok(match object.get("type").and_then(Value::as_str) {
        Some("in") => Filter::In { key, values },
        _ => Filter::NotIn { key, values },
    })
}

fn parse_key(object: &Map<String, Value>, path: &str) -> Result<String, String> {
    match object.get("key") {
        Some(Value::String(key)) => Ok(key.clone()),
        None => Err(format!("{path}.key is required")),
        Some(_) => Err(format!("{path}.key must be a string")),
    }
}

/// OpenAI refuses parameters it does not know rather than ignoring a misspelt one.
fn only_known(object: &Map<String, Value>, path: &str, known: &[&str]) -> Result<(), String> {
    match object.keys().find(|k| !known.contains(&k.as_str())) {
        Some(key) => Err(format!("unknown parameter: {path}.{key}")),
        None => Ok(()),
    }
}

fn scalar(value: &Value) -> Option<Scalar> {
    match value {
        Value::String(s) => Some(Scalar::String(s.clone())),
        Value::Number(n) => n.as_f64().map(Scalar::Number),
        Value::Bool(b) => Some(Scalar::Bool(*b)),
        _ => None,
    }
}

fn compare(attribute: Option<&Value>, op: Comparison, value: &Scalar) -> bool {
    match op {
        Comparison::Eq => equals(attribute, value),
        Comparison::Ne => !equals(attribute, value),
        Comparison::Gt => order(attribute, value) == Some(Ordering::Greater),
        Comparison::Gte => matches!(
            order(attribute, value),
            Some(Ordering::Greater | Ordering::Equal)
        ),
        Comparison::Lt => order(attribute, value) == Some(Ordering::Less),
        Comparison::Lte => matches!(
            order(attribute, value),
            Some(Ordering::Less | Ordering::Equal)
        ),
    }
}

/// Whether the attribute is present, of the value's type, and equal to it.
fn equals(attribute: Option<&Value>, value: &Scalar) -> bool {
    match (attribute, value) {
        (Some(Value::String(a)), Scalar::String(b)) => a == b,
        (Some(Value::Number(a)), Scalar::Number(b)) => a.as_f64() == Some(*b),
        (Some(Value::Bool(a)), Scalar::Bool(b)) => a == b,
        _ => false,
    }
}

/// The attribute's order against the value: none when it is missing, of another type, or a
/// boolean.
fn order(attribute: Option<&Value>, value: &Scalar) -> Option<Ordering> {
    match (attribute, value) {
        (Some(Value::String(a)), Scalar::String(b)) => Some(a.as_str().cmp(b.as_str())),
        (Some(Value::Number(a)), Scalar::Number(b)) => a.as_f64()?.partial_cmp(b),
        _ => None,
    }
}

/// Checks a file's `attributes` against OpenAI's limits: an object (or null, for none) of at
/// most 16 keys of at most 64 characters, each value a string of at most 512 characters, a
/// number or a boolean. The error is a sentence for a 400 with param `attributes`.
pub(crate) fn check_attributes(attributes: &Value) -> Result<(), String> {
    let object = match attributes {
        Value::Null => return Ok(()),
        Value::Object(object) => object,
        _ => return Err("attributes must be an object".to_string()),
    };
    if object.len() > MAX_ATTRIBUTES {
        return Err(format!(
            "attributes may have at most {MAX_ATTRIBUTES} keys, not {}",
            object.len()
        ));
    }
    for (key, value) in object {
        let key_chars = key.chars().count();
        if key_chars > MAX_KEY_CHARS {
            return Err(format!(
                "attributes keys must be at most {MAX_KEY_CHARS} characters, not {key_chars}"
            ));
        }
        match value {
            Value::String(s) if s.chars().count() > MAX_STRING_CHARS => {
                return Err(format!(
                    "attributes.{key} must be at most {MAX_STRING_CHARS} characters, not {}",
                    s.chars().count()
                ))
            }
            Value::String(_) | Value::Number(_) | Value::Bool(_) => {}
            _ => {
                return Err(format!(
                    "attributes.{key} must be a string, number or boolean"
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> Filter {
        Filter::parse(&value).unwrap_or_else(|e| panic!("{value}: {e}"))
    }

    fn error(value: Value) -> String {
        Filter::parse(&value).expect_err(&value.to_string())
    }

    /// Whether `{"type": op, "key": "k", "value": value}` passes a file whose `k` is `attribute`.
    fn passes(op: &str, attribute: Value, value: Value) -> bool {
        parse(json!({"type": op, "key": "k", "value": value})).matches(&json!({"k": attribute}))
    }

    #[test]
    fn each_comparison_on_numbers() {
        let cases = [
            ("eq", [false, true, false]),
            ("ne", [true, false, true]),
            ("gt", [false, false, true]),
            ("gte", [false, true, true]),
            ("lt", [true, false, false]),
            ("lte", [true, true, false]),
        ];
        for (op, expected) in cases {
            // The attribute 5 against 6, 5.0 (equal as f64) and 4.5.
            let got = [json!(6), json!(5.0), json!(4.5)].map(|v| passes(op, json!(5), v));
            assert_eq!(got, expected, "{op}");
        }
    }

    #[test]
    fn each_comparison_on_strings_and_booleans() {
        assert!(passes("eq", json!("pdf"), json!("pdf")));
        assert!(!passes("eq", json!("pdf"), json!("PDF")), "case matters");
        assert!(passes("ne", json!("pdf"), json!("txt")));
        assert!(passes("gt", json!("2024-06-01"), json!("2024-05-31")));
        assert!(passes("lte", json!("apple"), json!("apple")));
        assert!(
            passes("lt", json!("Zebra"), json!("apple")),
            "by code point"
        );
        assert!(passes("eq", json!(true), json!(true)));
        assert!(passes("ne", json!(true), json!(false)));
        assert!(
            !passes("gt", json!(true), json!(false)),
            "booleans have no order"
        );
        assert!(!passes("lte", json!(true), json!(true)));
    }

    #[test]
    fn in_and_nin_test_membership() {
        let values = json!(["a", 2, true]);
        assert!(passes("in", json!("a"), values.clone()));
        assert!(passes("in", json!(2.0), values.clone()));
        assert!(passes("in", json!(true), values.clone()));
        assert!(!passes("in", json!("b"), values.clone()));
        assert!(!passes("in", json!("2"), values.clone()), "no conversion");
        assert!(passes("nin", json!("b"), values.clone()));
        assert!(!passes("nin", json!("a"), values));
        assert!(!passes("in", json!("a"), json!([])));
        assert!(passes("nin", json!("a"), json!([])));
    }

    #[test]
    fn a_missing_key_passes_only_ne_and_nin() {
        let file = json!({"other": 1});
        for (op, value, expected) in [
            ("eq", json!(1), false),
            ("ne", json!(1), true),
            ("gt", json!(1), false),
            ("gte", json!(1), false),
            ("lt", json!(1), false),
            ("lte", json!(1), false),
            ("in", json!([1]), false),
            ("nin", json!([1]), true),
        ] {
            let filter = parse(json!({"type": op, "key": "k", "value": value}));
            assert_eq!(filter.matches(&file), expected, "{op}");
            assert_eq!(
                filter.matches(&Value::Null),
                expected,
                "{op}, no attributes"
            );
        }
    }

    #[test]
    fn a_value_of_another_type_is_unequal_and_unordered() {
        for (op, expected) in [
            ("eq", false),
            ("ne", true),
            ("gt", false),
            ("gte", false),
            ("lt", false),
            ("lte", false),
        ] {
            assert_eq!(
                passes(op, json!("5"), json!(5)),
                expected,
                "{op} string vs number"
            );
            assert_eq!(
                passes(op, json!(1), json!(true)),
                expected,
                "{op} number vs boolean"
            );
        }
    }

    #[test]
    fn compounds_nest() {
        // type = pdf and (year >= 2024 or pinned)
        let filter = parse(json!({"type": "and", "filters": [
            {"type": "eq", "key": "type", "value": "pdf"},
            {"type": "or", "filters": [
                {"type": "gte", "key": "year", "value": 2024},
                {"type": "eq", "key": "pinned", "value": true},
            ]},
        ]}));
        assert!(filter.matches(&json!({"type": "pdf", "year": 2025})));
        assert!(filter.matches(&json!({"type": "pdf", "year": 2020, "pinned": true})));
        assert!(!filter.matches(&json!({"type": "pdf", "year": 2020})));
        assert!(!filter.matches(&json!({"type": "txt", "year": 2025})));
    }

    #[test]
    fn errors_name_the_place_at_fault() {
        let cases = [
            (json!([]), "filters must be an object"),
            (
                json!({"type": "and", "filters": [{"type": "eq", "key": "a", "value": 1}, {"type": "like"}]}),
                "filters.filters[1].type must be one of eq, ne, gt, gte, lt, lte, in, nin, and, or",
            ),
            (json!({"type": "eq", "value": 1}), "filters.key is required"),
            (
                json!({"type": "eq", "key": 3, "value": 1}),
                "filters.key must be a string",
            ),
            (
                json!({"type": "eq", "key": "a"}),
                "filters.value is required",
            ),
            (
                json!({"type": "eq", "key": "a", "value": [1]}),
                "filters.value must be a string, number or boolean",
            ),
            (
                json!({"type": "lt", "key": "a", "value": null}),
                "filters.value must be a string, number or boolean",
            ),
            (
                json!({"type": "in", "key": "a", "value": "x"}),
                "filters.value must be an array of strings, numbers or booleans",
            ),
            (
                json!({"type": "nin", "key": "a", "value": [{"x": 1}]}),
                "filters.value must be an array of strings, numbers or booleans",
            ),
            (
                json!({"type": "or", "filters": []}),
                "filters.filters must be a non-empty array of filters",
            ),
            (
                json!({"type": "or"}),
                "filters.filters must be a non-empty array of filters",
            ),
            (
                json!({"type": "eq", "key": "a", "value": 1, "values": 2}),
                "unknown parameter: filters.values",
            ),
            (
                json!({"type": "or", "filters": [{"type": "and", "filters": [{"type": "eq", "key": "a", "value": 1, "x": 0}]}]}),
                "unknown parameter: filters.filters[0].filters[0].x",
            ),
        ];
        for (value, message) in cases {
            assert_eq!(error(value.clone()), message, "{value}");
        }
    }

    #[test]
    fn depth_and_size_are_capped() {
        let leaf = json!({"type": "eq", "key": "a", "value": 1});
        let nest = |levels: usize| {
            (0..levels).fold(
                leaf.clone(),
                |inner, _| json!({"type": "and", "filters": [inner]}),
            )
        };
        // Seven compounds and the comparison: eight levels.
        assert!(Filter::parse(&nest(7)).is_ok());
        let deep = error(nest(8));
        assert!(deep.ends_with("is nested deeper than 8 levels"), "{deep}");
        assert!(deep.starts_with("filters.filters[0].filters[0]"), "{deep}");
        let wide = |n: usize| json!({"type": "or", "filters": vec![leaf.clone(); n]});
        assert!(Filter::parse(&wide(63)).is_ok());
        assert_eq!(
            error(wide(64)),
            "filters may hold at most 64 filters in all"
        );
    }

    #[test]
    fn attributes_within_openai_limits_pass() {
        assert_eq!(check_attributes(&Value::Null), Ok(()));
        assert_eq!(check_attributes(&json!({})), Ok(()));
        let full: Map<String, Value> = (0..16)
            .map(|i| (format!("k{i}"), json!("é".repeat(512))))
            .collect();
        assert_eq!(check_attributes(&Value::Object(full)), Ok(()));
        let key = "ключ".repeat(16);
        assert_eq!(check_attributes(&json!({key: 1.5, "b": false})), Ok(()));
    }

    #[test]
    fn attributes_beyond_openai_limits_are_refused() {
        let many: Map<String, Value> = (0..17).map(|i| (format!("k{i}"), json!(i))).collect();
        let cases = [
            (json!("x"), "attributes must be an object"),
            (
                Value::Object(many),
                "attributes may have at most 16 keys, not 17",
            ),
            (
                json!({"k".repeat(65): 1}),
                "attributes keys must be at most 64 characters, not 65",
            ),
            (
                json!({"note": "x".repeat(513)}),
                "attributes.note must be at most 512 characters, not 513",
            ),
            (
                json!({"tags": ["a"]}),
                "attributes.tags must be a string, number or boolean",
            ),
            (
                json!({"gone": null}),
                "attributes.gone must be a string, number or boolean",
            ),
        ];
        for (value, message) in cases {
            assert_eq!(check_attributes(&value), Err(message.to_string()));
        }
    }
}
