//! How syncgate asks a model to answer from retrieved sources and cite them, and how it reads
//! the citations back (issue 16, `file_search` in `/v1/responses`). The sources are numbered
//! in the system prompt; the model cites one by writing its number in brackets, `[2]`, after
//! the sentence it supports; syncgate strips the markers and turns each into a
//! `file_citation` annotation at that place in the text. The built-in `mock` model answers
//! such a prompt by quoting its best source and citing it the same way.

/// What starts the list of sources in the system prompt (and what the mock looks for).
pub(crate) const SOURCES_HEADER: &str = "Sources:\n";

/// The instruction before the sources.
const INSTRUCTION: &str = "Answer the user's question from the sources below. After each \
sentence that uses a source, cite it by writing the source's number in square brackets, for \
example [1]. If the sources do not answer the question, say so.";

/// The longest part of a source the prompt carries.
const MAX_SOURCE_CHARS: usize = 4000;

/// A source given to the model: where it came from and its text.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Source {
    pub(crate) filename: String,
    pub(crate) text: String,
}

/// The system prompt: the caller's instructions (if any), the instruction to cite, and the
/// sources numbered from 1.
pub(crate) fn system_prompt(instructions: Option<&str>, sources: &[Source]) -> String {
    let mut prompt = String::new();
    if let Some(instructions) = instructions.filter(|i| !i.trim().is_empty()) {
        prompt.push_str(instructions.trim());
        prompt.push_str("\n\n");
    }
    prompt.push_str(INSTRUCTION);
    prompt.push_str("\n\n");
    prompt.push_str(SOURCES_HEADER);
    for (i, source) in sources.iter().enumerate() {
        let text: String = source.text.chars().take(MAX_SOURCE_CHARS).collect();
        prompt.push_str(&format!(
            "[{}] {}: {}\n\n",
            i + 1,
            source.filename,
            text.trim()
        ));
    }
    prompt
}

/// A citation read out of an answer: the source's index (from 0) and where in the stripped
/// text it stood (in characters, as OpenAI's `index` counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Citation {
    pub(crate) source: usize,
    pub(crate) index: usize,
}

/// The answer without its `[n]` markers (a space before one goes with it), and the citations
/// of sources 1..=`sources` in the order they stand. Brackets that name no source are left
/// as they are.
pub(crate) fn read_citations(answer: &str, sources: usize) -> (String, Vec<Citation>) {
    let mut text = String::with_capacity(answer.len());
    let mut chars_out = 0usize;
    let mut citations = Vec::new();
    let mut rest = answer;
    while let Some(open) = rest.find('[') {
        let (before, from) = rest.split_at(open);
        let number = from[1..]
            .find(']')
            .map(|close| &from[1..1 + close])
            .filter(|n| !n.is_empty() && n.len() <= 3 && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|n| (1..=sources).contains(n));
        match number {
            Some(n) => {
                let kept = before.strip_suffix(' ').unwrap_or(before);
                text.push_str(kept);
                chars_out += kept.chars().count();
                citations.push(Citation {
                    source: n - 1,
                    index: chars_out,
                });
                rest = &from[n.to_string().len() + 2..];
            }
            None => {
                text.push_str(before);
                text.push('[');
                chars_out += before.chars().count() + 1;
                rest = &from[1..];
            }
        }
    }
    text.push_str(rest);
    (text, citations)
}

/// The mock model's answer to a prompt made by [`system_prompt`]: the first sentence of
/// source 1, cited. `None` when the system text carries no sources.
pub(crate) fn mock_answer(system: &str) -> Option<String> {
    let sources = &system[system.find(SOURCES_HEADER)? + SOURCES_HEADER.len()..];
    let first = sources.strip_prefix("[1] ")?;
    let first = first.split("\n\n[2] ").next().unwrap_or(first);
    let text = first
        .split_once(": ")
        .map_or(first, |(_, text)| text)
        .trim();
    let sentence = first_sentence(text);
    Some(format!("{sentence} [1]"))
}

/// The text up to and including its first full stop, question or exclamation mark followed
/// by a space or the end (a heading line before it is skipped); the whole text when none.
fn first_sentence(text: &str) -> &str {
    let body = text
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#'))
        .map_or(text, |line| &text[text.find(line).unwrap_or(0)..]);
    let mut end = body.len();
    for (i, c) in body.char_indices() {
        if matches!(c, '.' | '!' | '?') {
            let next = body[i + c.len_utf8()..].chars().next();
            if next.is_none_or(char::is_whitespace) {
                end = i + c.len_utf8();
                break;
            }
        }
    }
    body[..end].trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sources() -> Vec<Source> {
        vec![
            Source {
                filename: "lighthouse.md".into(),
                text: "# Lighthouses\n\nA keeper trims the wick. Then he winds the clock.".into(),
            },
            Source {
                filename: "bread.md".into(),
                text: "Bread rises.".into(),
            },
        ]
    }

    #[test]
    fn the_prompt_numbers_the_sources_after_the_callers_instructions() {
        let prompt = system_prompt(Some("Be brief."), &sources());
        assert!(prompt.starts_with("Be brief.\n\n"), "{prompt}");
        assert!(
            prompt.contains("Sources:\n[1] lighthouse.md: # Lighthouses"),
            "{prompt}"
        );
        assert!(
            prompt.contains("\n\n[2] bread.md: Bread rises."),
            "{prompt}"
        );
    }

    #[test]
    fn markers_become_citations_at_their_place_in_the_stripped_text() {
        let (text, cites) = read_citations("The wick is trimmed [1]. Bread rises [2][1].", 2);
        assert_eq!(text, "The wick is trimmed. Bread rises.");
        assert_eq!(
            cites,
            [
                Citation {
                    source: 0,
                    index: 19
                },
                Citation {
                    source: 1,
                    index: 32
                },
                Citation {
                    source: 0,
                    index: 32
                },
            ]
        );
        // Brackets naming no source stay; characters, not bytes, are counted.
        let (text, cites) = read_citations("Ça [x] va [3] bien [1]", 2);
        assert_eq!(text, "Ça [x] va [3] bien");
        assert_eq!(
            cites,
            [Citation {
                source: 0,
                index: 18
            }]
        );
        assert_eq!(
            read_citations("no cites", 2),
            ("no cites".to_string(), vec![])
        );
        assert_eq!(read_citations("[", 1).0, "[");
    }

    #[test]
    fn the_mock_quotes_its_first_source_and_cites_it() {
        let prompt = system_prompt(None, &sources());
        assert_eq!(
            mock_answer(&prompt).as_deref(),
            Some("A keeper trims the wick. [1]")
        );
        assert_eq!(mock_answer("You are helpful."), None);
        let (text, cites) = read_citations(&mock_answer(&prompt).unwrap(), 2);
        assert_eq!(text, "A keeper trims the wick.");
        assert_eq!(
            cites,
            [Citation {
                source: 0,
                index: 24
            }]
        );
    }
}
