//! Cutting a file's text into chunks as OpenAI's vector stores do: windows of cl100k_base
//! tokens that overlap, sized by the file's chunking strategy (`auto`, or `static` with its
//! own sizes). Each chunk is embedded and searched on its own.

use serde_json::{json, Map, Value};
use tiktoken_rs::{cl100k_base_singleton, CoreBPE, Rank};

/// `auto`'s chunk size, as OpenAI documents it.
const AUTO_MAX_TOKENS: u32 = 800;
/// `auto`'s overlap, as OpenAI documents it.
const AUTO_OVERLAP_TOKENS: u32 = 400;
/// Smallest `max_chunk_size_tokens` OpenAI accepts.
const MIN_CHUNK_TOKENS: u32 = 100;
/// Largest `max_chunk_size_tokens` OpenAI accepts.
const MAX_CHUNK_TOKENS: u32 = 4096;
/// The tokenizer's input is cut into segments of at most this many bytes (see [`segments`]).
const SEGMENT_BYTES: usize = 8 * 1024;
/// A segment with no clean cut in it is cut hard at this many bytes (see [`segments`]).
const HARD_SEGMENT_BYTES: usize = 256;

/// How a file is cut into chunks: OpenAI's `chunking_strategy` of a file or vector store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Strategy {
    /// OpenAI's default: 800-token chunks overlapping by 400.
    Auto,
    /// Sizes the client chose, checked by [`Strategy::parse`].
    Static {
        max_chunk_size_tokens: u32,
        chunk_overlap_tokens: u32,
    },
}

impl Strategy {
    /// Reads OpenAI's `chunking_strategy` object: `{"type":"auto"}` or
    /// `{"type":"static","static":{"max_chunk_size_tokens":…,"chunk_overlap_tokens":…}}`.
    /// The error is a sentence naming the parameter at fault, for a 400 `invalid_request_error`
    /// with param `chunking_strategy`.
    pub(crate) fn parse(value: &Value) -> Result<Strategy, String> {
        let object = as_object(value, "chunking_strategy")?;
        match object.get("type").and_then(Value::as_str) {
            Some("auto") => {
                only_known(object, "chunking_strategy", &["type"])?;
                Ok(Strategy::Auto)
            }
            Some("static") => {
                only_known(object, "chunking_strategy", &["type", "static"])?;
                let sizes = object
                    .get("static")
                    .ok_or("chunking_strategy.static is required when type is static")?;
                parse_static(sizes)
            }
            _ => Err("chunking_strategy.type must be auto or static".to_string()),
        }
    }

    /// The chunk size and overlap in tokens, `auto` resolved to its numbers.
    pub(crate) fn sizes(self) -> (u32, u32) {
        match self {
            Strategy::Auto => (AUTO_MAX_TOKENS, AUTO_OVERLAP_TOKENS),
            Strategy::Static {
                max_chunk_size_tokens,
                chunk_overlap_tokens,
            } => (max_chunk_size_tokens, chunk_overlap_tokens),
        }
    }

    /// The strategy as a stored file reports it: always the resolved `static` shape, `auto`
    /// included, as OpenAI does. [`Strategy::parse`] reads it back.
    pub(crate) fn to_json(self) -> Value {
        let (max, overlap) = self.sizes();
        json!({
            "type": "static",
            "static": {"max_chunk_size_tokens": max, "chunk_overlap_tokens": overlap},
        })
    }
}

/// What a file reports when its strategy is not known (OpenAI's `{"type":"other"}`, for files
/// chunked before strategies existed).
pub(crate) fn unknown_strategy_json() -> Value {
    json!({"type": "other"})
}

/// The `static` object's two sizes, checked by OpenAI's rules: the chunk from 100 to 4096
/// tokens, the overlap from 0 to half the chunk.
fn parse_static(value: &Value) -> Result<Strategy, String> {
    let object = as_object(value, "chunking_strategy.static")?;
    only_known(
        object,
        "chunking_strategy.static",
        &["max_chunk_size_tokens", "chunk_overlap_tokens"],
    )?;
    let max = object
        .get("max_chunk_size_tokens")
        .ok_or("chunking_strategy.static.max_chunk_size_tokens is required")?
        .as_u64()
        .filter(|n| (u64::from(MIN_CHUNK_TOKENS)..=u64::from(MAX_CHUNK_TOKENS)).contains(n))
        .ok_or_else(|| {
            format!(
                "chunking_strategy.static.max_chunk_size_tokens must be an integer from \
                 {MIN_CHUNK_TOKENS} to {MAX_CHUNK_TOKENS}"
            )
        })? as u32;
    let overlap = object
        .get("chunk_overlap_tokens")
        .ok_or("chunking_strategy.static.chunk_overlap_tokens is required")?
        .as_u64()
        .filter(|&n| n <= u64::from(max / 2))
        .ok_or_else(|| {
            format!(
                "chunking_strategy.static.chunk_overlap_tokens must be an integer from 0 to \
                 half of max_chunk_size_tokens ({})",
                max / 2
            )
        })? as u32;
    Ok(Strategy::Static {
        max_chunk_size_tokens: max,
        chunk_overlap_tokens: overlap,
    })
}

fn as_object<'a>(value: &'a Value, path: &str) -> Result<&'a Map<String, Value>, String> {
    value
        .as_object()
        .ok_or_else(|| format!("{path} must be an object"))
}

/// OpenAI refuses parameters it does not know rather than ignoring a misspelt one.
fn only_known(object: &Map<String, Value>, path: &str, known: &[&str]) -> Result<(), String> {
    match object.keys().find(|k| !known.contains(&k.as_str())) {
        Some(key) => Err(format!("unknown parameter: {path}.{key}")),
        None => Ok(()),
    }
}

/// One piece of a file, embedded and searched on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Chunk {
    /// The chunk's text: a slice of the file's text, whole characters only.
    pub(crate) text: String,
    /// Tokens in the chunk's window: at most the strategy's chunk size.
    pub(crate) tokens: u32,
    /// Index of the window's first token in the whole text.
    pub(crate) start_token: u32,
}

/// Tokens in `text` as cl100k_base counts them (special tokens count as ordinary text).
#[cfg(test)]
pub(crate) fn count_tokens(text: &str) -> usize {
    segments(text)
        .map(|segment| bpe().encode_ordinary(segment).len())
        .sum()
}

/// The text cut into windows of the strategy's chunk size, each starting (chunk size −
/// overlap) tokens after the one before, the last ending at the text's end. Empty text has no
/// chunks.
///
/// A window's edge can fall inside a character that spans two tokens (an emoji, much CJK).
/// The edge is then moved outwards to the character's boundary, so every chunk is a valid
/// slice of the text and the character is kept whole in both chunks that meet there: no text
/// is lost, and a chunk's text may carry a token's worth more than its window.
pub(crate) fn chunk(text: &str, strategy: &Strategy) -> Vec<Chunk> {
    let (max, overlap) = strategy.sizes();
    let max = max.max(1) as usize;
    let step = max.saturating_sub(overlap as usize).max(1);
    let offsets = token_offsets(text);
    let tokens = offsets.len() - 1;
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < tokens {
        let end = (start + max).min(tokens);
        let from = floor_char_boundary(text, offsets[start]);
        let to = ceil_char_boundary(text, offsets[end]);
        chunks.push(Chunk {
            text: text[from..to].to_string(),
            tokens: (end - start) as u32,
            start_token: start as u32,
        });
        if end == tokens {
            break;
        }
        start += step;
    }
    chunks
}

/// The byte offset in `text` where each token starts, and the text's length last: token `i`
/// is bytes `offsets[i]..offsets[i + 1]`.
fn token_offsets(text: &str) -> Vec<usize> {
    let bpe = bpe();
    let mut offsets = vec![0];
    let mut at = 0;
    for segment in segments(text) {
        for token in bpe.encode_ordinary(segment) {
            at += token_len(bpe, token);
            offsets.push(at);
        }
    }
    debug_assert_eq!(at, text.len(), "the tokens' bytes spell the text");
    offsets
}

/// Bytes of one token. Every token `encode_ordinary` returns is in the table.
fn token_len(bpe: &CoreBPE, token: Rank) -> usize {
    bpe.decode_bytes(&[token]).map_or(0, |bytes| bytes.len())
}

/// The text in pieces the tokenizer handles safely, each tokenized on its own.
///
/// tiktoken-rs splits text with a backtracking regex that panics when one match grows huge (a
/// long run of letters or spaces), and its BPE grows with the square of a match's length. So
/// the text is cut every [`SEGMENT_BYTES`] or so, just before a space that follows a
/// non-space: no cl100k match crosses such a point, so the tokens are exactly those of the
/// whole text. Where there is no such space (a run of CJK, of one letter, of spaces), the cut
/// is hard every [`HARD_SEGMENT_BYTES`], at a character boundary, which may differ from whole
/// text tokenization by a token at each cut.
fn segments(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let cut = if rest.len() <= SEGMENT_BYTES {
            rest.len()
        } else {
            clean_cut(&rest[..floor_char_boundary(rest, SEGMENT_BYTES)])
                .unwrap_or_else(|| floor_char_boundary(rest, HARD_SEGMENT_BYTES))
        };
        let (segment, tail) = rest.split_at(cut);
        rest = tail;
        Some(segment)
    })
}

/// The last offset in `window` (but not 0) where a space follows a non-whitespace character.
fn clean_cut(window: &str) -> Option<usize> {
    let bytes = window.as_bytes();
    (1..bytes.len())
        .rev()
        .find(|&i| bytes[i] == b' ' && !window[..i].ends_with(char::is_whitespace))
}

/// The largest character boundary at or before `at` (std's is not stable yet).
fn floor_char_boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// The smallest character boundary at or after `at`.
fn ceil_char_boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at += 1;
    }
    at
}

/// cl100k_base, built once on first use and shared by every thread.
fn bpe() -> &'static CoreBPE {
    cl100k_base_singleton()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sized(max: u32, overlap: u32) -> Strategy {
        Strategy::Static {
            max_chunk_size_tokens: max,
            chunk_overlap_tokens: overlap,
        }
    }

    /// A text of exactly `n` tokens: " word" is one cl100k token.
    fn words(n: usize) -> String {
        " word".repeat(n)
    }

    #[test]
    fn tokens_are_counted_as_cl100k_base_does() {
        assert_eq!(count_tokens("hello world"), 2);
        assert_eq!(count_tokens(""), 0);
        assert_eq!(count_tokens(&words(1000)), 1000);
        // Special tokens are plain text in a file.
        assert!(count_tokens("<|endoftext|>") > 1);
    }

    #[test]
    fn a_short_text_is_one_chunk_and_empty_text_none() {
        let chunks = chunk("A short note about otters.", &Strategy::Auto);
        assert_eq!(chunks.len(), 1);
        assert_eq!(chunks[0].text, "A short note about otters.");
        assert_eq!(chunks[0].tokens as usize, count_tokens(&chunks[0].text));
        assert_eq!(chunks[0].start_token, 0);
        assert!(chunk("", &Strategy::Auto).is_empty());
    }

    #[test]
    fn long_text_windows_step_by_size_minus_overlap() {
        // 2000 tokens, auto: windows at 0, 400, 800, 1200; the last reaches the end.
        let chunks = chunk(&words(2000), &Strategy::Auto);
        let starts: Vec<u32> = chunks.iter().map(|c| c.start_token).collect();
        assert_eq!(starts, [0, 400, 800, 1200]);
        assert!(chunks.iter().all(|c| c.tokens == 800));
        assert!(chunks.iter().all(|c| c.text == words(800)));
    }

    #[test]
    fn the_last_window_is_short_when_the_text_ends_inside_it() {
        let chunks = chunk(&words(250), &sized(100, 0));
        let sizes: Vec<u32> = chunks.iter().map(|c| c.tokens).collect();
        assert_eq!(sizes, [100, 100, 50]);
        let joined: String = chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(joined, words(250));
    }

    #[test]
    fn overlapping_chunks_share_exactly_the_overlap() {
        let text: String = (0..600).map(|i| format!(" w{i}")).collect();
        let chunks = chunk(&text, &sized(200, 50));
        for pair in chunks.windows(2) {
            assert_eq!(pair[1].start_token, pair[0].start_token + 150);
            let (a, b) = (&pair[0].text, &pair[1].text);
            let shared = (0..a.len())
                .map(|i| &a[i..])
                .find(|tail| b.starts_with(tail));
            assert_eq!(count_tokens(shared.unwrap()), 50, "{a:?} / {b:?}");
        }
    }

    #[test]
    fn multi_byte_text_gives_valid_chunks_with_nothing_lost() {
        let text: String = (0..300)
            .map(|i| format!("{i}🦦 カワウソ👩‍👩‍👧‍👦東京{i}ü"))
            .collect();
        for (max, overlap) in [(100, 0), (100, 50), (101, 17), (800, 400)] {
            let chunks = chunk(&text, &sized(max, overlap));
            assert!(chunks.len() > 1, "{max}/{overlap}");
            // Every chunk is a slice of the text, so valid UTF-8, and each begins no later
            // than the one before it ended, the last at the text's end: nothing is lost.
            let mut end = 0;
            for c in &chunks {
                let at = text.find(&c.text).expect("a slice of the text");
                assert!(at <= end, "{max}/{overlap}: a gap before byte {end}");
                end = at + c.text.len();
            }
            assert_eq!(end, text.len());
        }
        // An edge inside a character keeps it whole on both sides.
        let chunks = chunk(&text, &sized(100, 0));
        let total: usize = chunks.iter().map(|c| c.text.len()).sum();
        assert!(total > text.len(), "some edge fell inside a character");
    }

    #[test]
    fn pathological_runs_are_chunked_without_panic() {
        for text in ["a".repeat(200_000), " ".repeat(50_000), "東".repeat(30_000)] {
            let chunks = chunk(&text, &Strategy::Auto);
            assert!(!chunks.is_empty());
            assert!(chunks.iter().all(|c| c.tokens <= 800));
        }
    }

    #[test]
    fn segmenting_long_prose_keeps_the_whole_text_tokens() {
        let text = "The quick brown fox, jumping over 12,345 lazy dogs; it's  spaced\n\n out. "
            .repeat(400);
        assert!(text.len() > 3 * SEGMENT_BYTES);
        let whole = bpe().encode_ordinary(&text);
        let pieces: Vec<Rank> = segments(&text)
            .flat_map(|s| bpe().encode_ordinary(s))
            .collect();
        assert_eq!(pieces, whole);
        assert_eq!(segments(&text).collect::<String>(), text);
    }

    #[test]
    fn strategies_parse_from_openai_json_and_report_as_static() {
        let auto = Strategy::parse(&json!({"type": "auto"})).unwrap();
        assert_eq!(auto, Strategy::Auto);
        assert_eq!(
            auto.to_json(),
            json!({"type":"static","static":{"max_chunk_size_tokens":800,"chunk_overlap_tokens":400}})
        );
        let custom = json!({"type":"static","static":{"max_chunk_size_tokens":100,"chunk_overlap_tokens":50}});
        let parsed = Strategy::parse(&custom).unwrap();
        assert_eq!(parsed, sized(100, 50));
        assert_eq!(parsed.to_json(), custom);
        assert_eq!(Strategy::parse(&parsed.to_json()).unwrap(), parsed);
        assert_eq!(unknown_strategy_json(), json!({"type": "other"}));
    }

    #[test]
    fn bad_strategies_are_refused_with_the_parameter_named() {
        let cases = [
            (json!("auto"), "chunking_strategy must be an object"),
            (json!({"type": "other"}), "chunking_strategy.type must be auto or static"),
            (json!({}), "chunking_strategy.type must be auto or static"),
            (json!({"type": "auto", "size": 3}), "unknown parameter: chunking_strategy.size"),
            (
                json!({"type": "static"}),
                "chunking_strategy.static is required when type is static",
            ),
            (
                json!({"type": "static", "static": {"chunk_overlap_tokens": 0}}),
                "chunking_strategy.static.max_chunk_size_tokens is required",
            ),
            (
                json!({"type": "static", "static": {"max_chunk_size_tokens": 99, "chunk_overlap_tokens": 0}}),
                "chunking_strategy.static.max_chunk_size_tokens must be an integer from 100 to 4096",
            ),
            (
                json!({"type": "static", "static": {"max_chunk_size_tokens": 4097, "chunk_overlap_tokens": 0}}),
                "chunking_strategy.static.max_chunk_size_tokens must be an integer from 100 to 4096",
            ),
            (
                json!({"type": "static", "static": {"max_chunk_size_tokens": 200.5, "chunk_overlap_tokens": 0}}),
                "chunking_strategy.static.max_chunk_size_tokens must be an integer from 100 to 4096",
            ),
            (
                json!({"type": "static", "static": {"max_chunk_size_tokens": 300}}),
                "chunking_strategy.static.chunk_overlap_tokens is required",
            ),
            (
                json!({"type": "static", "static": {"max_chunk_size_tokens": 300, "chunk_overlap_tokens": 151}}),
                "chunking_strategy.static.chunk_overlap_tokens must be an integer from 0 to half of max_chunk_size_tokens (150)",
            ),
            (
                json!({"type": "static", "static": {"max_chunk_size_tokens": 300, "chunk_overlap_tokens": -1}}),
                "chunking_strategy.static.chunk_overlap_tokens must be an integer from 0 to half of max_chunk_size_tokens (150)",
            ),
            (
                json!({"type": "static", "static": {"max_chunk_size_tokens": 300, "chunk_overlap_tokens": 1, "x": 1}}),
                "unknown parameter: chunking_strategy.static.x",
            ),
        ];
        for (value, message) in cases {
            assert_eq!(Strategy::parse(&value), Err(message.to_string()), "{value}");
        }
        assert!(Strategy::parse(&json!({"type":"static","static":{"max_chunk_size_tokens":4096,"chunk_overlap_tokens":2048}})).is_ok());
    }
}
