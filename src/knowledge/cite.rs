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

/// What reading an answer gives, in the order it stands: text to show, and a citation at the
/// place the text has reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    Text(String),
    Cite(Citation),
}

/// Reads the citations out of an answer: the text without its `[n]` markers (a space before
/// one goes with it), and a citation for each marker naming a source 1..=`sources`, at its
/// place in that text; brackets that name no source stay as they are. The answer may come in
/// pieces (a stream), and reads the same however it is cut: a tail that a later piece could
/// still make part of a marker (a trailing space; `[` and at most three digits) is held
/// until the next piece, or the end, settles it.
pub(crate) struct Reader {
    sources: usize,
    held: String,
    /// Characters of stripped text given so far (where the next citation stands).
    chars_out: usize,
}

impl Reader {
    pub(crate) fn new(sources: usize) -> Reader {
        Reader {
            sources,
            held: String::new(),
            chars_out: 0,
        }
    }

    /// The next piece of the answer; what of it (and of what was held) is settled.
    pub(crate) fn push(&mut self, piece: &str) -> Vec<Piece> {
        self.held.push_str(piece);
        let settled: String = self.held.drain(..unsettled(&self.held)).collect();
        self.read(&settled)
    }

    /// The answer ended: whatever was held.
    pub(crate) fn finish(&mut self) -> Vec<Piece> {
        let rest = std::mem::take(&mut self.held);
        self.read(&rest)
    }

    /// Reads settled text: markers naming a source become citations, the rest is text.
    fn read(&mut self, mut rest: &str) -> Vec<Piece> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        while let Some(open) = rest.find('[') {
            let (before, from) = rest.split_at(open);
            let number = from[1..]
                .find(']')
                .map(|close| &from[1..1 + close])
                .filter(|n| is_marker_number(n) && !n.is_empty())
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|n| (1..=self.sources).contains(n));
            match number {
                Some(n) => {
                    text.push_str(before.strip_suffix(' ').unwrap_or(before));
                    self.chars_out += text.chars().count();
                    if !text.is_empty() {
                        pieces.push(Piece::Text(std::mem::take(&mut text)));
                    }
                    pieces.push(Piece::Cite(Citation {
                        source: n - 1,
                        index: self.chars_out,
                    }));
                    rest = &from[n.to_string().len() + 2..];
                }
                None => {
                    text.push_str(before);
                    text.push('[');
                    rest = &from[1..];
                }
            }
        }
        text.push_str(rest);
        self.chars_out += text.chars().count();
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        pieces
    }
}

/// Whether `n` may be (the start of) a marker's number: at most three ASCII digits.
fn is_marker_number(n: &str) -> bool {
    n.len() <= 3 && n.bytes().all(|b| b.is_ascii_digit())
}

/// Where the tail of `text` that more text could still make part of a marker begins: a last
/// `[` with at most three digits after it (and the space before it), or a trailing space.
fn unsettled(text: &str) -> usize {
    let hold_from = match text.rfind('[') {
        Some(open) if is_marker_number(&text[open + 1..]) => open,
        _ => text.len(),
    };
    if text[..hold_from].ends_with(' ') {
        hold_from - 1
    } else {
        hold_from
    }
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

    /// The answer read whole, as a response that is not streamed reads it: the text without
    /// its markers, and the citations.
    fn read_citations(answer: &str, sources: usize) -> (String, Vec<Citation>) {
        let mut reader = Reader::new(sources);
        let mut pieces = reader.push(answer);
        pieces.extend(reader.finish());
        let mut text = String::with_capacity(answer.len());
        let mut citations = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Text(t) => text.push_str(&t),
                Piece::Cite(c) => citations.push(c),
            }
        }
        (text, citations)
    }

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

    #[test]
    fn an_answer_read_in_pieces_gives_what_the_whole_gives() {
        let answer = "Ça [x] va [3] bien [1]. The wick  [2][1] is [12 trimmed [1";
        let whole = read_citations(answer, 2);
        let chars: Vec<char> = answer.chars().collect();
        // Every way of cutting it in two, and one character at a time.
        let mut cuts: Vec<Vec<String>> = (0..=chars.len())
            .map(|i| {
                vec![
                    chars[..i].iter().collect::<String>(),
                    chars[i..].iter().collect::<String>(),
                ]
            })
            .collect();
        cuts.push(chars.iter().map(|c| c.to_string()).collect());
        for pieces in cuts {
            let mut reader = Reader::new(2);
            let mut got = Vec::new();
            for p in &pieces {
                got.extend(reader.push(p));
            }
            got.extend(reader.finish());
            let mut text = String::new();
            let mut cites = Vec::new();
            for piece in got {
                match piece {
                    Piece::Text(t) => text.push_str(&t),
                    Piece::Cite(c) => {
                        assert_eq!(c.index, text.chars().count(), "{pieces:?}");
                        cites.push(c);
                    }
                }
            }
            assert_eq!((text, cites), whole, "{pieces:?}");
        }
        // A marker is never shown while it may still be one.
        let mut reader = Reader::new(2);
        assert_eq!(
            reader.push("Bread rises ["),
            [Piece::Text("Bread rises".into())]
        );
        assert_eq!(reader.push("2"), []);
        assert_eq!(
            reader.push("]."),
            [
                Piece::Cite(Citation {
                    source: 1,
                    index: 11
                }),
                Piece::Text(".".into())
            ]
        );
    }
}
