//! Text out of an uploaded file, for the knowledge base to chunk and embed (issue 16): plain
//! text and Markdown as they are, HTML through a small converter of our own, PDF through the
//! pdf-extract crate on a thread of its own, each under caps on input size, output size and (for
//! PDF, the one parser we did not write) time.

use std::borrow::Cow;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;

/// What a file holds, which decides how its text is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Text,
    Markdown,
    Html,
    Pdf,
}

/// The kind of an uploaded file: by its name's extension first (clients send
/// `application/octet-stream` for most files), then by its media type; `None` when neither is
/// one we read, which the caller reports as `unsupported_file`.
pub(crate) fn kind_of(filename: &str, content_type: Option<&str>) -> Option<Kind> {
    let extension = filename
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase());
    let by_extension = match extension.as_deref() {
        Some("txt" | "text") => Some(Kind::Text),
        Some("md" | "markdown") => Some(Kind::Markdown),
        Some("html" | "htm") => Some(Kind::Html),
        Some("pdf") => Some(Kind::Pdf),
        _ => None,
    };
    by_extension.or_else(|| {
        let media_type = content_type?.split(';').next()?.trim().to_ascii_lowercase();
        match media_type.as_str() {
            "text/plain" => Some(Kind::Text),
            "text/markdown" | "text/x-markdown" => Some(Kind::Markdown),
            "text/html" => Some(Kind::Html),
            "application/pdf" => Some(Kind::Pdf),
            _ => None,
        }
    })
}

/// The bounds on one extraction, so one upload cannot take all the memory or a job thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Caps {
    /// Most bytes of input; larger is refused before any parsing (default 32 MiB, the upload
    /// limit). It is also what bounds a PDF read that outlives `pdf_timeout`.
    pub(crate) max_input_bytes: usize,
    /// Most characters of extracted text; more fails the file rather than indexing part of it
    /// (default 10,000,000, about 2.5 million tokens).
    pub(crate) max_output_chars: usize,
    /// Longest wait for the PDF reader (default 60 s).
    pub(crate) pdf_timeout: Duration,
}

impl Default for Caps {
    fn default() -> Caps {
        Caps {
            max_input_bytes: 32 * 1024 * 1024,
            max_output_chars: 10_000_000,
            pdf_timeout: Duration::from_secs(60),
        }
    }
}

/// Why a file yielded no text. [`ExtractError::code`] is the file's `last_error.code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ExtractError {
    /// The input is over `max_input_bytes`.
    InputTooLarge { limit: usize },
    /// Text, Markdown or HTML that is not UTF-8; `offset` is the first bad byte's.
    NotUtf8 { offset: usize },
    /// The PDF reader refused the file or panicked on it.
    BadPdf { detail: String },
    /// The PDF reader ran past `pdf_timeout`; it goes on in the background.
    TimedOut { after: Duration },
    /// No thread could be started for the PDF reader.
    NoThread { detail: String },
    /// The text is over `max_output_chars`.
    OutputTooLarge { limit: usize },
    /// The file holds no text (or only whitespace): nothing to search.
    NoText,
}

impl ExtractError {
    /// The OpenAI `last_error.code` for a file that failed with this: `unsupported_file` for
    /// content we cannot read as text, `invalid_file` for a broken or oversized file,
    /// `server_error` when the fault is ours (time, threads), so a retry may succeed.
    pub(crate) fn code(&self) -> &'static str {
        match self {
            ExtractError::NotUtf8 { .. } | ExtractError::NoText => "unsupported_file",
            ExtractError::InputTooLarge { .. }
            | ExtractError::BadPdf { .. }
            | ExtractError::OutputTooLarge { .. } => "invalid_file",
            ExtractError::TimedOut { .. } | ExtractError::NoThread { .. } => "server_error",
        }
    }
}

impl fmt::Display for ExtractError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExtractError::InputTooLarge { limit } => {
                write!(
                    f,
                    "the file is larger than {limit} bytes, the most that is read"
                )
            }
            ExtractError::NotUtf8 { offset } => write!(
                f,
                "the file is not UTF-8 text (invalid byte at offset {offset}); save it as UTF-8"
            ),
            ExtractError::BadPdf { detail } => write!(f, "the PDF cannot be read: {detail}"),
            ExtractError::TimedOut { after } => write!(
                f,
                "reading the PDF took longer than {} seconds",
                after.as_secs_f64()
            ),
            ExtractError::NoThread { detail } => {
                write!(f, "cannot start a thread to read the PDF: {detail}")
            }
            ExtractError::OutputTooLarge { limit } => {
                write!(f, "the file's text is longer than {limit} characters")
            }
            ExtractError::NoText => write!(f, "the file has no text"),
        }
    }
}

impl std::error::Error for ExtractError {}

/// The text of a file of `kind`, within `caps`.
pub(crate) fn extract(kind: Kind, bytes: &[u8], caps: &Caps) -> Result<String, ExtractError> {
    if bytes.len() > caps.max_input_bytes {
        return Err(ExtractError::InputTooLarge {
            limit: caps.max_input_bytes,
        });
    }
    let text = match kind {
        Kind::Text | Kind::Markdown => utf8(bytes)?.to_string(),
        Kind::Html => html_to_text(utf8(bytes)?),
        Kind::Pdf => tidy(&pdf_text(bytes, caps.pdf_timeout)?),
    };
    if text.trim().is_empty() {
        return Err(ExtractError::NoText);
    }
    if text.chars().count() > caps.max_output_chars {
        return Err(ExtractError::OutputTooLarge {
            limit: caps.max_output_chars,
        });
    }
    Ok(text)
}

/// The bytes as UTF-8, a byte-order mark dropped. Strict, not lossy: a file in another encoding
/// (Latin-1, UTF-16) would be indexed as replacement characters that no query matches, and
/// the uploader would never learn why; failing tells them to convert it.
fn utf8(bytes: &[u8]) -> Result<&str, ExtractError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    std::str::from_utf8(bytes).map_err(|e| ExtractError::NotUtf8 {
        offset: e.valid_up_to(),
    })
}

/// Lines with trailing whitespace cut, runs of blank lines made one, none at either end.
fn tidy(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank = false;
    for line in text.lines().map(str::trim_end) {
        if line.is_empty() {
            blank = true;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank { "\n\n" } else { "\n" });
        }
        blank = false;
        out.push_str(line);
    }
    out
}

/// The stack of the PDF reader's thread: its parser recurses into nested objects, and an
/// overflow would abort the process, which no `catch_unwind` can stop. Only the pages it touches
/// take memory.
const PDF_STACK_BYTES: usize = 16 * 1024 * 1024;

/// The text of a PDF, read on a thread named `sg-pdf` and waited for at most `timeout`.
/// pdf-extract panics on some malformed files: the panic is caught on that thread and becomes
/// [`ExtractError::BadPdf`] (the panic hook may still print it to stderr).
fn pdf_text(bytes: &[u8], timeout: Duration) -> Result<String, ExtractError> {
    let bytes = bytes.to_vec();
    let read = move || {
        pdf_extract::extract_text_from_mem(&bytes).map_err(|e| match e {
            // Its own message would start "PDF error: ", after our "the PDF cannot be read".
            pdf_extract::OutputError::PdfError(e) => e.to_string(),
            other => other.to_string(),
        })
    };
    match run_with_deadline("sg-pdf", timeout, read) {
        Ok(Ok(text)) => Ok(text),
        Ok(Err(detail)) => Err(ExtractError::BadPdf { detail }),
        Err(Waited::Panicked(why)) => Err(ExtractError::BadPdf {
            detail: format!("the reader failed on it ({why})"),
        }),
        Err(Waited::TimedOut) => Err(ExtractError::TimedOut { after: timeout }),
        Err(Waited::NoThread(e)) => Err(ExtractError::NoThread {
            detail: e.to_string(),
        }),
    }
}

/// Why [`run_with_deadline`] has no result.
#[derive(Debug)]
enum Waited {
    /// The work panicked; the panic's message.
    Panicked(String),
    /// The work was still running at the deadline.
    TimedOut,
    /// The thread could not be started.
    NoThread(std::io::Error),
}

/// Runs `work` on a new thread named `name`, under `catch_unwind`, and waits at most `timeout`
/// for it. A thread cannot be killed: at the deadline it is left to finish in the background
/// and its result is dropped. What bounds it is its input (`max_input_bytes`).
fn run_with_deadline<T, F>(name: &str, timeout: Duration, work: F) -> Result<T, Waited>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    // Room for the one result, so a thread finishing after the deadline never blocks on it.
    let (done, result) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name(name.into())
        .stack_size(PDF_STACK_BYTES)
        .spawn(move || {
            let outcome = panic::catch_unwind(AssertUnwindSafe(work)).map_err(panic_message);
            let _ = done.send(outcome);
        })
        .map_err(Waited::NoThread)?;
    match result.recv_timeout(timeout) {
        Ok(outcome) => outcome.map_err(Waited::Panicked),
        Err(RecvTimeoutError::Timeout) => Err(Waited::TimedOut),
        // The thread always sends before it ends; this is only for completeness.
        Err(RecvTimeoutError::Disconnected) => Err(Waited::Panicked("no result".into())),
    }
}

/// The message a panic was raised with, when it is a string.
fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic".to_string()
    }
}

/// Elements that stand apart from the text around them by a blank line.
const PARAGRAPHS: &[&str] = &[
    "p",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "pre",
    "blockquote",
    "ul",
    "ol",
    "dl",
    "table",
    "figure",
];
/// Elements that start and end a line.
const LINES: &[&str] = &[
    "br",
    "hr",
    "div",
    "li",
    "tr",
    "title",
    "section",
    "article",
    "header",
    "footer",
    "nav",
    "aside",
    "main",
    "dt",
    "dd",
    "figcaption",
    "caption",
    "form",
    "fieldset",
    "address",
    "details",
    "summary",
];
/// Elements whose content is code or styling, never shown.
const HIDDEN: &[&str] = &["script", "style"];

/// Readable text out of HTML: the title as a first line, tags dropped, blocks on their own lines
/// (list items as `- `), table cells apart, entities decoded, whitespace collapsed except in
/// `<pre>`; scripts, styles and comments gone. Malformed HTML is read as a browser would, more
/// or less: unclosed elements just go on, a `<` that starts no tag is text.
fn html_to_text(html: &str) -> String {
    let mut out = TextOut::default();
    let mut in_pre = 0usize;
    let mut rest = html;
    while let Some(lt) = rest.find('<') {
        out.text(&decode_entities(&rest[..lt]), in_pre > 0);
        rest = &rest[lt..];
        let Some(tag) = Tag::read(rest) else {
            out.text("<", in_pre > 0);
            rest = &rest[1..];
            continue;
        };
        rest = tag.after;
        let name = tag.name.as_str();
        if HIDDEN.contains(&name) && !tag.closing {
            rest = skip_raw_text(rest, name);
        } else if PARAGRAPHS.contains(&name) {
            out.line_break(2);
        } else if LINES.contains(&name) {
            out.line_break(1);
        } else if name == "td" || name == "th" {
            out.space();
        }
        if name == "li" && !tag.closing {
            out.text("- ", true);
        }
        if name == "pre" {
            in_pre = if tag.closing {
                in_pre.saturating_sub(1)
            } else {
                in_pre + 1
            };
        }
    }
    out.text(&decode_entities(rest), in_pre > 0);
    tidy(&out.text)
}

/// A tag, or a comment or declaration (whose `name` is empty), read from text starting at `<`.
struct Tag<'a> {
    /// Lower-case element name.
    name: String,
    closing: bool,
    /// The text after its `>`.
    after: &'a str,
}

impl<'a> Tag<'a> {
    /// The tag at the start of `text`, or `None` when the `<` starts none (`a < b`). A tag or
    /// comment that never closes swallows the rest, as in a browser.
    fn read(text: &'a str) -> Option<Tag<'a>> {
        let skipped = |after| {
            Some(Tag {
                name: String::new(),
                closing: false,
                after,
            })
        };
        if let Some(comment) = text.strip_prefix("<!--") {
            return skipped(comment.find("-->").map_or("", |end| &comment[end + 3..]));
        }
        if text.starts_with("<!") || text.starts_with("<?") {
            return skipped(text.find('>').map_or("", |end| &text[end + 1..]));
        }
        let (closing, body) = match text.strip_prefix("</") {
            Some(body) => (true, body),
            None => (false, &text[1..]),
        };
        if !body.starts_with(|c: char| c.is_ascii_alphabetic()) {
            return None;
        }
        let name_len = body
            .find(|c: char| !c.is_ascii_alphanumeric())
            .unwrap_or(body.len());
        let after = tag_end(body).map_or("", |end| &body[end + 1..]);
        Some(Tag {
            name: body[..name_len].to_ascii_lowercase(),
            closing,
            after,
        })
    }
}

/// Where a tag's closing `>` is, passing over quoted attribute values (a quote opens one only
/// right after `=`, so `<a title=it's>` still ends at its `>`).
fn tag_end(tag: &str) -> Option<usize> {
    let mut quote = None;
    let mut after_equals = false;
    for (i, b) in tag.bytes().enumerate() {
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'>' => return Some(i),
            None if (b == b'"' || b == b'\'') && after_equals => quote = Some(b),
            None => {}
        }
        if !b.is_ascii_whitespace() {
            after_equals = b == b'=';
        }
    }
    None
}

/// The text after the end tag of a script or style whose content starts `text`.
fn skip_raw_text<'a>(text: &'a str, name: &str) -> &'a str {
    let end_tag = format!("</{name}");
    let found = text
        .as_bytes()
        .windows(end_tag.len())
        .position(|w| w.eq_ignore_ascii_case(end_tag.as_bytes()));
    match found {
        Some(at) => {
            let rest = &text[at + end_tag.len()..];
            rest.find('>').map_or("", |end| &rest[end + 1..])
        }
        None => "",
    }
}

/// Text being built from HTML: whitespace collapsed as it comes, line breaks held until text
/// follows them, so neither piles up at the edges.
#[derive(Default)]
struct TextOut {
    text: String,
    /// Whitespace came since the last character.
    space: bool,
    /// Line breaks asked for since the last character: 1 ends a line, 2 leaves a blank one.
    breaks: usize,
}

impl TextOut {
    /// Adds text; outside `<pre>` (`verbatim` false) runs of whitespace become one space.
    fn text(&mut self, text: &str, verbatim: bool) {
        for c in text.chars() {
            if c.is_whitespace() && !verbatim {
                self.space = true;
            } else {
                self.push(c);
            }
        }
    }

    fn push(&mut self, c: char) {
        if !self.text.is_empty() {
            if self.breaks > 0 {
                self.text.extend(std::iter::repeat_n('\n', self.breaks));
            } else if self.space && !self.text.ends_with(char::is_whitespace) {
                self.text.push(' ');
            }
        }
        self.breaks = 0;
        self.space = false;
        self.text.push(c);
    }

    fn space(&mut self) {
        self.space = true;
    }

    fn line_break(&mut self, lines: usize) {
        self.breaks = self.breaks.max(lines);
        self.space = false;
    }
}

/// Text with its character references decoded: the common named ones, `&#NNN;` and `&#xHH;`.
/// Anything else that starts with `&` is kept as it is.
fn decode_entities(text: &str) -> Cow<'_, str> {
    if !text.contains('&') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        match entity(rest) {
            Some((c, len)) => {
                out.push(c);
                rest = &rest[len..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// The character a reference at the start of `text` stands for, and the reference's length.
/// A number that is no character (0, a surrogate, past U+10FFFF) becomes U+FFFD.
fn entity(text: &str) -> Option<(char, usize)> {
    let semicolon = text.bytes().take(12).position(|b| b == b';')?;
    let reference = &text[1..semicolon];
    let c = if let Some(number) = reference.strip_prefix('#') {
        let (digits, radix) = match number.strip_prefix(['x', 'X']) {
            Some(hex) => (hex, 16),
            None => (number, 10),
        };
        if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
            return None;
        }
        u32::from_str_radix(digits, radix)
            .ok()
            .and_then(char::from_u32)
            .filter(|&c| c != '\0')
            .unwrap_or('\u{FFFD}')
    } else {
        named_entity(reference)?
    };
    Some((c, semicolon + 1))
}

fn named_entity(name: &str) -> Option<char> {
    Some(match name {
        "amp" => '&',
        "lt" => '<',
        "gt" => '>',
        "quot" => '"',
        "apos" => '\'',
        "nbsp" => '\u{A0}',
        "copy" => '©',
        "reg" => '®',
        "trade" => '™',
        "hellip" => '…',
        "mdash" => '—',
        "ndash" => '–',
        "lsquo" => '‘',
        "rsquo" => '’',
        "ldquo" => '“',
        "rdquo" => '”',
        "laquo" => '«',
        "raquo" => '»',
        "bull" => '•',
        "middot" => '·',
        "deg" => '°',
        "times" => '×',
        "euro" => '€',
        _ => return None,
    })
}

/// A one-page PDF showing `text` (ASCII) in Helvetica, its cross-reference table exact: a real
/// file for tests that need one.
#[cfg(test)]
pub(crate) fn tiny_pdf(text: &str) -> Vec<u8> {
    assert!(text.is_ascii(), "tiny_pdf writes ASCII text only");
    let mut escaped = String::new();
    for c in text.chars() {
        if matches!(c, '(' | ')' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    let content = format!("BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET");
    let objects = [
        "<< /Type /Catalog /Pages 2 0 R >>".to_string(),
        "<< /Type /Pages /Kids [3 0 R] /Count 1 >>".to_string(),
        "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] \
         /Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>"
            .to_string(),
        "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_string(),
        format!(
            "<< /Length {} >>\nstream\n{content}\nendstream",
            content.len()
        ),
    ];
    let mut pdf = b"%PDF-1.4\n".to_vec();
    let mut offsets = Vec::new();
    for (i, object) in objects.iter().enumerate() {
        offsets.push(pdf.len());
        pdf.extend_from_slice(format!("{} 0 obj\n{object}\nendobj\n", i + 1).as_bytes());
    }
    let xref = pdf.len();
    let count = objects.len() + 1;
    pdf.extend_from_slice(format!("xref\n0 {count}\n0000000000 65535 f \n").as_bytes());
    for offset in offsets {
        // Each entry is exactly 20 bytes: 10 digits, space, 5 digits, space, n, space, LF.
        pdf.extend_from_slice(format!("{offset:010} 00000 n \n").as_bytes());
    }
    pdf.extend_from_slice(
        format!("trailer\n<< /Size {count} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n").as_bytes(),
    );
    pdf
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_of(kind: Kind, bytes: &[u8]) -> Result<String, ExtractError> {
        extract(kind, bytes, &Caps::default())
    }

    fn html(html: &str) -> String {
        text_of(Kind::Html, html.as_bytes()).unwrap()
    }

    #[test]
    fn kinds_come_from_the_extension_first_then_the_media_type() {
        assert_eq!(kind_of("notes.txt", None), Some(Kind::Text));
        assert_eq!(kind_of("NOTES.TEXT", None), Some(Kind::Text));
        assert_eq!(
            kind_of("notes.md", Some("application/octet-stream")),
            Some(Kind::Markdown)
        );
        assert_eq!(kind_of("a.Markdown", None), Some(Kind::Markdown));
        assert_eq!(kind_of("page.HTM", None), Some(Kind::Html));
        assert_eq!(kind_of("page.html", Some("text/plain")), Some(Kind::Html));
        assert_eq!(kind_of("paper.pdf", None), Some(Kind::Pdf));
        assert_eq!(
            kind_of("upload", Some("Text/Plain; charset=utf-8")),
            Some(Kind::Text)
        );
        assert_eq!(
            kind_of("blob.bin", Some("text/markdown")),
            Some(Kind::Markdown)
        );
        assert_eq!(kind_of("x", Some("text/html")), Some(Kind::Html));
        assert_eq!(kind_of("x", Some("application/pdf")), Some(Kind::Pdf));
        assert_eq!(kind_of("sheet.xlsx", None), None);
        assert_eq!(kind_of("photo.png", Some("image/png")), None);
        assert_eq!(kind_of("noextension", None), None);
    }

    #[test]
    fn text_and_markdown_come_out_as_they_are_without_a_bom() {
        let markdown = "# Title\r\n\r\n- item  with  spaces\n";
        assert_eq!(
            text_of(Kind::Markdown, markdown.as_bytes()).unwrap(),
            markdown
        );
        assert_eq!(
            text_of(Kind::Text, b"\xEF\xBB\xBFhello \xC3\xA9t\xC3\xA9").unwrap(),
            "hello été"
        );
    }

    #[test]
    fn text_that_is_not_utf8_is_refused_not_replaced() {
        let err = text_of(Kind::Text, b"caf\xE9 au lait").unwrap_err();
        assert_eq!(err, ExtractError::NotUtf8 { offset: 3 });
        assert_eq!(err.code(), "unsupported_file");
        assert!(err.to_string().contains("offset 3"), "{err}");
        // UTF-16 with its BOM is not UTF-8 either.
        assert!(text_of(Kind::Text, b"\xFF\xFEh\0i\0").is_err());
        assert!(text_of(Kind::Html, b"<p>\xFF</p>").is_err());
    }

    #[test]
    fn a_file_with_no_text_is_refused() {
        for (kind, bytes) in [
            (Kind::Text, &b""[..]),
            (Kind::Markdown, b" \r\n\t\n"),
            (
                Kind::Html,
                b"<html><head><script>x()</script></head><body> </body></html>",
            ),
        ] {
            let err = text_of(kind, bytes).unwrap_err();
            assert_eq!(err, ExtractError::NoText, "{kind:?}");
            assert_eq!(err.to_string(), "the file has no text");
        }
    }

    #[test]
    fn input_over_its_cap_is_refused_before_parsing() {
        let caps = Caps {
            max_input_bytes: 4,
            ..Caps::default()
        };
        assert_eq!(extract(Kind::Text, b"four", &caps).unwrap(), "four");
        for kind in [Kind::Text, Kind::Html, Kind::Pdf] {
            let err = extract(kind, b"five!", &caps).unwrap_err();
            assert_eq!(err, ExtractError::InputTooLarge { limit: 4 });
            assert_eq!(err.code(), "invalid_file");
        }
    }

    #[test]
    fn text_over_its_cap_fails_naming_the_cap() {
        let caps = Caps {
            max_output_chars: 5,
            ..Caps::default()
        };
        assert_eq!(
            extract(Kind::Text, "ééééé".as_bytes(), &caps).unwrap(),
            "ééééé"
        );
        let err = extract(Kind::Text, b"sixsix", &caps).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the file's text is longer than 5 characters"
        );
        assert_eq!(err.code(), "invalid_file");
    }

    #[test]
    fn html_drops_scripts_styles_comments_and_tags() {
        let page = r#"<!DOCTYPE html>
            <html><head><title>The  Title</title>
            <style>p { color: red }</style>
            <script type="text/javascript">if (a < b) { alert("</p>"); }</script>
            <meta charset="utf-8"></head>
            <body><!-- a comment <p>hidden</p> -->
            <p>Some <b>bold</b>   and <a href="/x?a=1&amp;b=2" title='it>s'>linked</a>
            text.</p><SCRIPT>evil()</SCRIPT ><p>After.</p></body></html>"#;
        assert_eq!(
            html(page),
            "The Title\n\nSome bold and linked text.\n\nAfter."
        );
    }

    #[test]
    fn html_blocks_become_lines_and_list_items_get_dashes() {
        let page = "<h1>Heading</h1><div>one</div><div>two<br>three<br/>four</div>\
            <ul>\n  <li>apples</li>\n  <li>pears\n</ul>\
            <table><tr><th>k</th><th>v</th></tr><tr><td>a</td><td>1</td></tr></table>\
            <pre>  fn main() {\n      go();\n  }</pre><p>end</p>";
        assert_eq!(
            html(page),
            "Heading\n\none\ntwo\nthree\nfour\n\n- apples\n- pears\n\nk v\na 1\n\n  \
             fn main() {\n      go();\n  }\n\nend"
        );
    }

    #[test]
    fn html_entities_are_decoded() {
        assert_eq!(
            html(
                "<p>a &amp; b &lt;c&gt; &quot;d&quot; &apos;e&apos;&nbsp;f &#65;&#x42;&#X43; \
                  &mdash; &copy; &unknown; &amp &#xD800; &#0; AT&T</p>"
            ),
            "a & b <c> \"d\" 'e' f ABC — © &unknown; &amp \u{FFFD} \u{FFFD} AT&T"
        );
    }

    #[test]
    fn malformed_html_is_read_anyway() {
        assert_eq!(html("<p>unclosed <b>bold<p>next"), "unclosed bold\n\nnext");
        assert_eq!(
            html("if a < b and c<=d then <3"),
            "if a < b and c<=d then <3"
        );
        assert_eq!(html("text <!-- never closed <p>gone"), "text");
        assert_eq!(html("kept <div class=\"x"), "kept");
        assert_eq!(html("a</p>b</div></li>c"), "a\n\nb\nc");
        assert_eq!(
            text_of(Kind::Html, b"<p>shown</p><script>never closed"),
            Ok("shown".to_string())
        );
    }

    #[test]
    fn a_small_pdf_yields_its_text() {
        let pdf = tiny_pdf("Hello knowledge base");
        let text = text_of(Kind::Pdf, &pdf).unwrap();
        assert_eq!(text.trim(), "Hello knowledge base");
        let text = text_of(Kind::Pdf, &tiny_pdf("a (parenthesised) \\ word")).unwrap();
        assert_eq!(text.trim(), "a (parenthesised) \\ word");
    }

    #[test]
    fn a_malformed_pdf_is_an_error_not_a_crash() {
        let pdf = tiny_pdf("Hello knowledge base");
        let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
        let mut corrupt_stream = pdf.clone();
        let at = corrupt_stream.windows(2).position(|w| w == b"BT").unwrap();
        corrupt_stream[at..at + 40].fill(b'(');
        // A Type0 font without its descendant fonts: pdf-extract panics on it (same length, so
        // the cross-reference offsets stay right).
        let panicking = String::from_utf8(pdf.clone())
            .unwrap()
            .replace("/Subtype /Type1", "/Subtype /Type0")
            .into_bytes();
        for bytes in [
            &pdf[..pdf.len() / 2],
            &pdf[..20],
            b"%PDF-1.4\n",
            b"not a pdf at all",
            &garbage,
            &corrupt_stream,
            &panicking,
        ] {
            let err = text_of(Kind::Pdf, bytes).unwrap_err();
            assert!(
                matches!(err.code(), "invalid_file" | "unsupported_file"),
                "{err}"
            );
        }
        let err = text_of(Kind::Pdf, &panicking).unwrap_err();
        assert!(err.to_string().contains("the reader failed on it"), "{err}");
        assert_eq!(err.code(), "invalid_file");
    }

    #[test]
    fn a_panic_in_the_reader_thread_is_caught() {
        let outcome: Result<(), Waited> =
            run_with_deadline("sg-test", Duration::from_secs(10), || panic!("boom"));
        assert!(matches!(outcome, Err(Waited::Panicked(why)) if why == "boom"));
        let name = run_with_deadline("sg-test", Duration::from_secs(10), || {
            std::thread::current().name().map(str::to_string)
        });
        assert_eq!(name.unwrap().as_deref(), Some("sg-test"));
    }

    #[test]
    fn a_reader_past_its_deadline_is_left_behind() {
        let (release, held) = crossbeam_channel::bounded::<()>(0);
        let outcome = run_with_deadline("sg-test", Duration::from_millis(20), move || {
            let _ = held.recv();
        });
        assert!(matches!(outcome, Err(Waited::TimedOut)));
        drop(release);
        let err = ExtractError::TimedOut {
            after: Duration::from_secs(60),
        };
        assert_eq!(err.code(), "server_error");
        assert_eq!(
            err.to_string(),
            "reading the PDF took longer than 60 seconds"
        );
    }
}
