//! `POST /v1/embeddings` for the mock upstream: deterministic unit vectors from the words of
//! each input, the same as the built-in `mock` model's, so texts that share words embed close
//! together and the same text always embeds the same way.

use serde_json::{json, Value};

use crate::api::ApiError;
use crate::knowledge::words;
use crate::providers::mock::estimate_tokens;

/// Dimensions when the request does not ask for `dimensions`.
const DEFAULT_DIMENSIONS: usize = 16;
/// Most dimensions a request may ask for (OpenAI's largest model has 3072).
const MAX_DIMENSIONS: usize = 4096;
/// Most inputs in one request, as OpenAI allows.
const MAX_INPUTS: usize = 2048;

/// A checked embeddings request.
#[derive(Debug)]
pub(crate) struct EmbeddingsRequest {
    pub(crate) model: String,
    pub(crate) inputs: Vec<String>,
    pub(crate) dimensions: usize,
    /// `encoding_format: "base64"`: little-endian f32s, base64-encoded. The OpenAI Python SDK
    /// asks for this by default, so the mock must speak it for the SDK to just work.
    pub(crate) base64: bool,
}

/// Reads and checks the body; errors name the parameter at fault, as the gateway's do.
pub(crate) fn parse(body: &[u8]) -> Result<EmbeddingsRequest, ApiError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(invalid("", "the request body must be a JSON object"));
    };
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        None | Some(Value::Null) => {
            return Err(invalid("model", "missing required parameter: 'model'"))
        }
        Some(_) => return Err(invalid("model", "'model' must be a non-empty string")),
    };
    let inputs = match obj.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if !items.is_empty() && items.len() <= MAX_INPUTS => items
            .iter()
            .map(|item| item.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid("input", "'input' must be a string or an array of strings"))?,
        None | Some(Value::Null) => {
            return Err(invalid("input", "missing required parameter: 'input'"))
        }
        Some(_) => {
            return Err(invalid(
                "input",
                "'input' must be a string or an array of 1 to 2048 strings",
            ))
        }
    };
    let dimensions = match obj.get("dimensions") {
        None | Some(Value::Null) => DEFAULT_DIMENSIONS,
        Some(v) => match v.as_u64() {
            Some(n) if (1..=MAX_DIMENSIONS as u64).contains(&n) => n as usize,
            _ => {
                return Err(invalid(
                    "dimensions",
                    "'dimensions' must be an integer from 1 to 4096",
                ))
            }
        },
    };
    let base64 = match obj.get("encoding_format") {
        None | Some(Value::Null) => false,
        Some(Value::String(f)) if f == "float" => false,
        Some(Value::String(f)) if f == "base64" => true,
        Some(_) => {
            return Err(invalid(
                "encoding_format",
                "'encoding_format' must be \"float\" or \"base64\"",
            ))
        }
    };
    Ok(EmbeddingsRequest {
        model,
        inputs,
        dimensions,
        base64,
    })
}

fn invalid(param: &str, message: &str) -> ApiError {
    ApiError::InvalidRequest {
        message: message.to_string(),
        param: param.to_string(),
    }
}

/// The answer in OpenAI's list shape.
pub(crate) fn reply_json(request: &EmbeddingsRequest) -> Value {
    let data: Vec<Value> = request
        .inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            let vector = embed(text, request.dimensions);
            let embedding = if request.base64 {
                json!(base64(&vector))
            } else {
                json!(vector)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    let tokens: u64 = request.inputs.iter().map(|t| estimate_tokens(t)).sum();
    json!({
        "object": "list",
        "data": data,
        "model": request.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })
}

/// A unit vector of `dimensions` components from the text's words ([`words::embed`]): exactly
/// what the gateway's built-in `mock` model answers.
pub(crate) fn embed(text: &str, dimensions: usize) -> Vec<f32> {
    words::embed(text, dimensions)
}

/// The vector as OpenAI sends `encoding_format: "base64"`: little-endian f32s, standard base64.
fn base64(vector: &[f32]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_are_deterministic_unit_length_and_differ_by_text() {
        let a = embed("hello", 16);
        assert_eq!(a, embed("hello", 16));
        assert_eq!(a, embed("Hello!", 16), "words, not characters, count");
        assert_ne!(a, embed("goodbye", 16));
        assert_eq!(a.len(), 16);
        let norm: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
        assert_eq!(embed("", 3).len(), 3);
    }

    #[test]
    fn the_mock_upstream_embeds_exactly_as_the_mock_model() {
        for text in [
            "",
            "hello",
            "Otters hold hands while they sleep.",
            "東京の川 🦦",
        ] {
            for dimensions in [1, 16, 1536] {
                assert_eq!(
                    embed(text, dimensions),
                    crate::providers::mock::embed(text, dimensions)
                );
            }
        }
    }

    #[test]
    fn a_query_is_closer_to_a_document_sharing_its_words_than_to_an_unrelated_one() {
        let cosine = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let query = embed("refund policy for damaged items", 64);
        let document = embed(
            "Our refund policy: damaged items are replaced or refunded.",
            64,
        );
        let unrelated = embed("Sea otters hold hands while they sleep.", 64);
        assert!(cosine(&query, &document) > cosine(&query, &unrelated) + 0.3);
    }

    #[test]
    fn base64_matches_the_standard_encoding() {
        // 1.0f32 is 00 00 80 3f little-endian; two of them are 8 bytes.
        assert_eq!(base64(&[1.0]), "AACAPw==");
        assert_eq!(base64(&[1.0, 1.0]), "AACAPwAAgD8=");
        assert_eq!(base64(&[]), "");
    }

    #[test]
    fn inputs_parse_from_a_string_or_an_array() {
        let one = parse(br#"{"model":"e","input":"hi"}"#).unwrap();
        assert_eq!(one.inputs, ["hi"]);
        assert_eq!(one.dimensions, DEFAULT_DIMENSIONS);
        let many =
            parse(br#"{"model":"e","input":["a","b"],"dimensions":8,"encoding_format":"base64"}"#)
                .unwrap();
        assert_eq!(many.inputs, ["a", "b"]);
        assert!(many.base64 && many.dimensions == 8);
    }

    #[test]
    fn bad_bodies_name_the_parameter() {
        for (body, param) in [
            (r#"{"input":"x"}"#, "model"),
            (r#"{"model":"e"}"#, "input"),
            (r#"{"model":"e","input":[]}"#, "input"),
            (r#"{"model":"e","input":[1,2]}"#, "input"),
            (r#"{"model":"e","input":"x","dimensions":0}"#, "dimensions"),
            (
                r#"{"model":"e","input":"x","encoding_format":"hex"}"#,
                "encoding_format",
            ),
        ] {
            match parse(body.as_bytes()) {
                Err(ApiError::InvalidRequest { param: p, .. }) => assert_eq!(p, param, "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
        assert!(matches!(parse(b"{"), Err(ApiError::InvalidJson(_))));
    }
}
