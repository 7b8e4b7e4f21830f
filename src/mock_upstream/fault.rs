//! Fault specs: the ways the mock upstream misbehaves on cue, parsed from `--fault SPEC` (every
//! request) or the `x-mock-fault: SPEC` header (one request). The grammar is small on purpose:
//! one fault per request, written the same way in both places.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// How one request is to be answered, beyond the plain reply. docs/mock-upstream.md describes
/// what each does to a plain and to a streamed answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// `none`: answer normally (lets a header lift the flag's fault for one request).
    None,
    /// `status=CODE[,retry-after=S]`: an OpenAI-shaped error with this status instead.
    Status {
        code: u16,
        retry_after_s: Option<u64>,
    },
    /// `hang`: read the request, never answer.
    Hang,
    /// `slow-head=MS`: wait this much longer before the response head.
    SlowHead(Duration),
    /// `stall-after=K`: K content chunks (streamed) or K body bytes (plain), then silence.
    StallAfter(usize),
    /// `truncate-after=K`: K content chunks (streamed) or half the body (plain), then close.
    TruncateAfter(usize),
    /// `malformed`: a 200 whose body (or whose events) is not valid JSON.
    Malformed,
    /// `reset`: reset the connection right after reading the request.
    Reset,
    /// `error-event`: a stream that ends with an error event (plain: a 500).
    ErrorEvent,
}

/// Why a spec did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FaultError {
    /// The name is not one of the faults.
    Unknown(String),
    /// The name is known but its value is missing, not a number, or out of range.
    BadValue { spec: String, why: &'static str },
}

/// The grammar, for error messages.
const SPECS: &str = "none, status=CODE[,retry-after=S], hang, slow-head=MS, stall-after=K, \
                     truncate-after=K, malformed, reset, error-event";

impl fmt::Display for FaultError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultError::Unknown(spec) => {
                write!(f, "unknown fault {spec:?}; expected one of: {SPECS}")
            }
            FaultError::BadValue { spec, why } => write!(f, "invalid fault {spec:?}: {why}"),
        }
    }
}

impl std::error::Error for FaultError {}

impl FromStr for Fault {
    type Err = FaultError;

    fn from_str(spec: &str) -> Result<Fault, FaultError> {
        let spec = spec.trim();
        let bad = |why| FaultError::BadValue {
            spec: spec.to_string(),
            why,
        };
        let (name, value) = match spec.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim())),
            None => (spec, None),
        };
        let number = |why| value.and_then(|v| v.parse::<u64>().ok()).ok_or(bad(why));
        let count = |why| number(why).map(|n| n as usize);
        match (name, value) {
            ("none", None) => Ok(Fault::None),
            ("hang", None) => Ok(Fault::Hang),
            ("malformed", None) => Ok(Fault::Malformed),
            ("reset", None) => Ok(Fault::Reset),
            ("error-event", None) => Ok(Fault::ErrorEvent),
            ("status", Some(value)) => parse_status(value).map_err(bad),
            ("slow-head", Some(_)) => Ok(Fault::SlowHead(Duration::from_millis(number(
                "slow-head takes milliseconds, e.g. slow-head=500",
            )?))),
            ("stall-after", Some(_)) => Ok(Fault::StallAfter(count(
                "stall-after takes a count, e.g. stall-after=3",
            )?)),
            ("truncate-after", Some(_)) => Ok(Fault::TruncateAfter(count(
                "truncate-after takes a count, e.g. truncate-after=3",
            )?)),
            ("none" | "hang" | "malformed" | "reset" | "error-event", Some(_)) => {
                Err(bad("this fault takes no value"))
            }
            ("status" | "slow-head" | "stall-after" | "truncate-after", None) => {
                Err(bad("this fault needs a value, e.g. status=503"))
            }
            _ => Err(FaultError::Unknown(spec.to_string())),
        }
    }
}

/// `CODE` or `CODE,retry-after=S` (what follows `status=`).
fn parse_status(value: &str) -> Result<Fault, &'static str> {
    let (code, rest) = match value.split_once(',') {
        Some((code, rest)) => (code.trim(), Some(rest.trim())),
        None => (value, None),
    };
    let code = match code.parse::<u16>() {
        Ok(code) if (400..=599).contains(&code) => code,
        _ => return Err("status takes an error status from 400 to 599, e.g. status=503"),
    };
    let retry_after_s = match rest.map(|r| r.split_once('=')) {
        None => None,
        Some(Some(("retry-after", s))) => Some(
            s.trim()
                .parse::<u64>()
                .map_err(|_| "retry-after takes whole seconds, e.g. retry-after=2")?,
        ),
        Some(_) => return Err("after status=CODE only `,retry-after=S` may follow"),
    };
    Ok(Fault::Status {
        code,
        retry_after_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(spec: &str) -> Result<Fault, FaultError> {
        spec.parse()
    }

    #[test]
    fn every_fault_parses() {
        assert_eq!(parse("none"), Ok(Fault::None));
        assert_eq!(
            parse("status=503"),
            Ok(Fault::Status {
                code: 503,
                retry_after_s: None
            })
        );
        assert_eq!(
            parse(" status=429, retry-after=2 "),
            Ok(Fault::Status {
                code: 429,
                retry_after_s: Some(2)
            })
        );
        assert_eq!(parse("hang"), Ok(Fault::Hang));
        assert_eq!(
            parse("slow-head=250"),
            Ok(Fault::SlowHead(Duration::from_millis(250)))
        );
        assert_eq!(parse("stall-after=3"), Ok(Fault::StallAfter(3)));
        assert_eq!(parse("truncate-after=0"), Ok(Fault::TruncateAfter(0)));
        assert_eq!(parse("malformed"), Ok(Fault::Malformed));
        assert_eq!(parse("reset"), Ok(Fault::Reset));
        assert_eq!(parse("error-event"), Ok(Fault::ErrorEvent));
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        for (spec, says) in [
            ("explode", "expected one of"),
            ("", "expected one of"),
            ("HANG", "expected one of"),
            ("status=200", "400 to 599"),
            ("status=abc", "400 to 599"),
            ("status", "needs a value"),
            ("status=503,retry-after=soon", "whole seconds"),
            ("status=503,wait=1", "retry-after"),
            ("hang=1", "no value"),
            ("slow-head=-5", "milliseconds"),
            ("stall-after=x", "count"),
            ("truncate-after", "needs a value"),
        ] {
            let message = parse(spec).unwrap_err().to_string();
            assert!(message.contains(says), "{spec:?}: {message}");
            assert!(message.contains(&format!("{:?}", spec.trim())), "{message}");
        }
    }
}
