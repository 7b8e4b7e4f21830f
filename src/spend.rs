//! What calls cost (issue 19). Prices are per model target (`provider/upstream-model`) in the
//! config's `[[prices]]` tables, in US dollars per million tokens, and are kept as integer
//! micro-dollars per million tokens, so a cost is integer arithmetic: one dollar per million
//! tokens is exactly one micro-dollar per token. A call's cost is rounded to the nearest
//! micro-dollar (half away from zero), once, from the usage its provider reported.
//!
//! A target with no price (and the built-in `mock`) is unpriced: its calls have no cost, and
//! are counted as unpriced, never as free and never guessed.

use std::collections::HashMap;

use crate::tokens::Usage;

/// Micro-dollars in a dollar.
pub(crate) const MICROS_PER_USD: i64 = 1_000_000;
/// The highest price a config may set, in dollars per million tokens (a typo guard).
pub(crate) const MAX_USD_PER_MTOK: f64 = 10_000.0;

/// One target's prices, micro-dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Price {
    pub(crate) input: u64,
    /// Prompt tokens the provider served from its cache; the input price when not set.
    pub(crate) cached_input: Option<u64>,
    pub(crate) output: u64,
}

impl Price {
    /// From dollars per million tokens, as the config writes them; `Err` names what is wrong.
    pub(crate) fn from_usd(
        input: f64,
        cached_input: Option<f64>,
        output: f64,
    ) -> Result<Price, String> {
        let micros = |what: &str, usd: f64| -> Result<u64, String> {
            if !usd.is_finite() || !(0.0..=MAX_USD_PER_MTOK).contains(&usd) {
                return Err(format!(
                    "{what} must be a number of dollars per million tokens from 0 to {MAX_USD_PER_MTOK}, not {usd}"
                ));
            }
            Ok((usd * MICROS_PER_USD as f64).round() as u64)
        };
        Ok(Price {
            input: micros("input_per_mtok_usd", input)?,
            cached_input: cached_input
                .map(|c| micros("cached_input_per_mtok_usd", c))
                .transpose()?,
            output: micros("output_per_mtok_usd", output)?,
        })
    }

    /// The cost of `usage`, in micro-dollars.
    pub(crate) fn cost(&self, usage: Usage) -> i64 {
        let cached = usage.cached_tokens.min(usage.prompt_tokens);
        let fresh = usage.prompt_tokens - cached;
        let pico = u128::from(fresh) * u128::from(self.input)
            + u128::from(cached) * u128::from(self.cached_input.unwrap_or(self.input))
            + u128::from(usage.completion_tokens) * u128::from(self.output);
        // Micro-dollars per million tokens × tokens = millionths of a micro-dollar.
        let micros = (pico + 500_000) / 1_000_000;
        i64::try_from(micros).unwrap_or(i64::MAX)
    }
}

/// Every configured price, by target.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Prices {
    by_target: HashMap<String, Price>,
}

impl Prices {
    /// Adds `target`'s price; `false` (and the first price kept) when it already has one.
    pub(crate) fn insert(&mut self, target: &str, price: Price) -> bool {
        match self.by_target.entry(target.to_string()) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(price);
                true
            }
        }
    }

    /// The price of a call served by `provider` as `upstream_model`, if it has one.
    pub(crate) fn of(&self, provider: &str, upstream_model: &str) -> Option<&Price> {
        if self.by_target.is_empty() {
            return None;
        }
        self.by_target.get(&format!("{provider}/{upstream_model}"))
    }
}

/// What one call cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cost {
    /// Its target has no price: not free, unknown.
    Unpriced,
    Priced {
        micros: i64,
        /// Part of its usage was estimated (a stream whose provider never reported usage).
        estimated: bool,
    },
}

impl Cost {
    /// The cost of `usage` served by `provider` as `upstream_model`.
    pub(crate) fn of(
        prices: &Prices,
        provider: &str,
        upstream_model: &str,
        usage: Usage,
        estimated: bool,
    ) -> Cost {
        match prices.of(provider, upstream_model) {
            None => Cost::Unpriced,
            Some(price) => Cost::Priced {
                micros: price.cost(usage),
                estimated,
            },
        }
    }

    /// Micro-dollars, when priced.
    pub(crate) fn micros(self) -> Option<i64> {
        match self {
            Cost::Unpriced => None,
            Cost::Priced { micros, .. } => Some(micros),
        }
    }

    pub(crate) fn is_estimated(self) -> bool {
        matches!(
            self,
            Cost::Priced {
                estimated: true,
                ..
            }
        )
    }

    /// Two calls' costs together (a batch): unpriced only when both are.
    pub(crate) fn plus(self, other: Cost) -> Cost {
        match (self, other) {
            (Cost::Unpriced, c) | (c, Cost::Unpriced) => c,
            (
                Cost::Priced {
                    micros: a,
                    estimated: x,
                },
                Cost::Priced {
                    micros: b,
                    estimated: y,
                },
            ) => Cost::Priced {
                micros: a.saturating_add(b),
                estimated: x || y,
            },
        }
    }
}

/// Micro-dollars as dollars, for JSON (`cost_usd`).
pub(crate) fn usd(micros: i64) -> f64 {
    micros as f64 / MICROS_PER_USD as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(prompt: u64, cached: u64, completion: u64) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: cached,
        }
    }

    #[test]
    fn a_cost_is_tokens_times_the_price_rounded_to_the_micro_dollar() {
        // gpt-4o-mini's prices: $0.15 in, $0.075 cached, $0.60 out per million tokens.
        let p = Price::from_usd(0.15, Some(0.075), 0.60).unwrap();
        assert_eq!(
            (p.input, p.cached_input, p.output),
            (150_000, Some(75_000), 600_000)
        );
        // 1,000 in and 500 out: 150 + 300 µ$.
        assert_eq!(p.cost(usage(1_000, 0, 500)), 450);
        // 400 of the 1,000 cached: 600 × 0.15 + 400 × 0.075 + 500 × 0.6 = 90 + 30 + 300.
        assert_eq!(p.cost(usage(1_000, 400, 500)), 420);
        // 3 tokens at $0.15: 0.45 µ$ rounds to 0; 4 tokens: 0.6 rounds to 1.
        assert_eq!(p.cost(usage(3, 0, 0)), 0);
        assert_eq!(p.cost(usage(4, 0, 0)), 1);
        // No cached price: cached tokens cost the input price.
        let q = Price::from_usd(2.0, None, 8.0).unwrap();
        assert_eq!(q.cost(usage(1_000, 1_000, 0)), 2_000);
        // A million tokens each way at $2 / $8 is $10.
        assert_eq!(q.cost(usage(1_000_000, 0, 1_000_000)), 10 * MICROS_PER_USD);
        // Huge counts do not overflow.
        assert_eq!(
            Price::from_usd(MAX_USD_PER_MTOK, None, MAX_USD_PER_MTOK)
                .unwrap()
                .cost(usage(u64::MAX, 0, u64::MAX)),
            i64::MAX
        );
    }

    #[test]
    fn a_bad_price_is_named() {
        for (input, cached, output, named) in [
            (-1.0, None, 1.0, "input_per_mtok_usd"),
            (1.0, Some(f64::NAN), 1.0, "cached_input_per_mtok_usd"),
            (1.0, None, 1e9, "output_per_mtok_usd"),
        ] {
            let e = Price::from_usd(input, cached, output).unwrap_err();
            assert!(e.starts_with(named), "{e}");
        }
    }

    #[test]
    fn unpriced_targets_have_no_cost_and_sums_keep_what_is_known() {
        let mut prices = Prices::default();
        assert!(prices.insert(
            "openai/gpt-4o-mini",
            Price::from_usd(0.15, None, 0.6).unwrap()
        ));
        assert!(!prices.insert(
            "openai/gpt-4o-mini",
            Price::from_usd(1.0, None, 1.0).unwrap()
        ));
        let u = usage(1_000, 0, 500);
        assert_eq!(Cost::of(&prices, "mock", "mock", u, false), Cost::Unpriced);
        let priced = Cost::of(&prices, "openai", "gpt-4o-mini", u, false);
        assert_eq!(priced.micros(), Some(450));
        assert_eq!(priced.plus(Cost::Unpriced), priced);
        assert_eq!(Cost::Unpriced.plus(Cost::Unpriced), Cost::Unpriced);
        let estimated = Cost::Priced {
            micros: 5,
            estimated: true,
        };
        assert_eq!(priced.plus(estimated).micros(), Some(455));
        assert!(priced.plus(estimated).is_estimated());
        assert_eq!(usd(1_500_000), 1.5);
    }
}
