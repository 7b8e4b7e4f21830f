//! multipart/form-data bodies (RFC 7578, framed as RFC 2046 says): the file uploads of
//! `/v1/files`. The front end has read the body whole; this finds its parts, under limits of our
//! own, and the parts borrow the body rather than copy a 32 MiB upload.
//!
//! Line endings: the standard says CRLF, and the SDKs, curl and browsers all send it. A body
//! whose first delimiter line ends in a bare LF is read with bare-LF delimiters throughout, for
//! the hand-written clients that do that. The first delimiter decides, so a CRLF body's content
//! may hold `\n--boundary` without ending its part. Header lines are read either way.

use std::fmt;

/// The longest boundary RFC 2046 allows.
const MAX_BOUNDARY_BYTES: usize = 70;
/// Default: most parts in one body. An upload has two (`purpose`, `file`).
pub(crate) const MAX_PARTS: usize = 16;
/// Default: most bytes of one part's header block, its blank line included.
pub(crate) const MAX_HEADER_BYTES: usize = 8 * 1024;
/// Default: most bytes of a part other than the upload; form fields are short.
pub(crate) const MAX_FIELD_BYTES: usize = 64 * 1024;
/// The name of the part that holds the upload: only it may be as large as `max_file_bytes`.
pub(crate) const FILE_FIELD: &str = "file";

/// How much one body may hold; going past any of these is "too large" (413), not malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Most parts in the body (default [`MAX_PARTS`]).
    pub(crate) max_parts: usize,
    /// Most bytes of one part's header block (default [`MAX_HEADER_BYTES`]).
    pub(crate) max_header_bytes: usize,
    /// Most bytes of the content of the part named [`FILE_FIELD`]: the caller's to choose.
    pub(crate) max_file_bytes: usize,
    /// Most bytes of the content of any other part (default [`MAX_FIELD_BYTES`]).
    pub(crate) max_field_bytes: usize,
}

impl Limits {
    /// The default limits, with the caller's limit for the upload itself.
    pub(crate) fn new(max_file_bytes: usize) -> Limits {
        Limits {
            max_parts: MAX_PARTS,
            max_header_bytes: MAX_HEADER_BYTES,
            max_file_bytes,
            max_field_bytes: MAX_FIELD_BYTES,
        }
    }
}

/// One part of a body: a form field, or a file when it has a filename.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Part<'a> {
    /// The `name` of its Content-Disposition: the form field it fills.
    pub(crate) name: String,
    /// The file's name as the client gave it (`filename*` preferred over `filename`).
    pub(crate) filename: Option<String>,
    /// Its Content-Type header, as sent.
    pub(crate) content_type: Option<String>,
    /// Its content, every byte as sent, borrowed from the body.
    pub(crate) data: &'a [u8],
}

impl<'a> Part<'a> {
    /// The content as text, for form fields such as `purpose`: it must be UTF-8.
    pub(crate) fn text(&self) -> Result<&'a str, MultipartError> {
        std::str::from_utf8(self.data).map_err(|_| MultipartError::NotText {
            name: self.name.clone(),
        })
    }
}

/// The first part with this name, if any.
pub(crate) fn field<'p, 'a>(parts: &'p [Part<'a>], name: &str) -> Option<&'p Part<'a>> {
    parts.iter().find(|p| p.name == name)
}

/// Why a Content-Type or a body was refused. [`MultipartError::is_too_large`] tells a 413 from
/// a 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum MultipartError {
    /// The Content-Type is not multipart/form-data.
    NotFormData { content_type: String },
    /// The Content-Type is multipart/form-data, but its parameters do not give a usable
    /// boundary; `why` completes "the multipart/form-data Content-Type …".
    BadBoundary { why: String },
    /// No delimiter line with the boundary appears anywhere in the body.
    NoDelimiter,
    /// The body ends inside a part's headers or content, before the close delimiter.
    Unterminated,
    /// A part's header block does not parse (part numbers count from 1).
    BadHeader { part: usize, why: String },
    /// A part's Content-Disposition is missing or has no `name`.
    MissingName { part: usize },
    /// A part's header block is over `max_header_bytes`.
    HeadersTooLarge { part: usize, limit: usize },
    /// The body has more than `max_parts` parts.
    TooManyParts { limit: usize },
    /// A part's content is over its limit (`max_file_bytes` or `max_field_bytes`).
    PartTooLarge { name: String, limit: usize },
    /// A field read as text is not UTF-8.
    NotText { name: String },
}

impl MultipartError {
    /// Whether the body broke a size limit (answer 413) rather than being malformed (400).
    pub(crate) fn is_too_large(&self) -> bool {
        matches!(
            self,
            MultipartError::HeadersTooLarge { .. }
                | MultipartError::TooManyParts { .. }
                | MultipartError::PartTooLarge { .. }
        )
    }
}

impl fmt::Display for MultipartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MultipartError::NotFormData { content_type } => write!(
                f,
                "expected a multipart/form-data body, but the Content-Type is {content_type:?}"
            ),
            MultipartError::BadBoundary { why } => {
                write!(f, "the multipart/form-data Content-Type {why}")
            }
            MultipartError::NoDelimiter => write!(
                f,
                "the multipart body does not contain the boundary given in its Content-Type"
            ),
            MultipartError::Unterminated => {
                write!(f, "the multipart body ends before its closing boundary")
            }
            MultipartError::BadHeader { part, why } => {
                write!(
                    f,
                    "part {part} of the multipart body has a malformed header: {why}"
                )
            }
            MultipartError::MissingName { part } => write!(
                f,
                "part {part} of the multipart body has no name in its Content-Disposition header"
            ),
            MultipartError::HeadersTooLarge { part, limit } => write!(
                f,
                "the headers of part {part} of the multipart body are larger than {limit} bytes"
            ),
            MultipartError::TooManyParts { limit } => {
                write!(f, "the multipart body has more than {limit} parts")
            }
            MultipartError::PartTooLarge { name, limit } => {
                write!(f, "part '{name}' is larger than {limit} bytes")
            }
            MultipartError::NotText { name } => write!(f, "part '{name}' is not UTF-8 text"),
        }
    }
}

impl std::error::Error for MultipartError {}

/// The boundary of a `multipart/form-data` Content-Type value: media type and parameter names
/// in any case, the boundary quoted or not, other parameters (`charset`) ignored.
pub(crate) fn boundary(content_type: &str) -> Result<String, MultipartError> {
    let (media_type, params) = content_type.split_once(';').unwrap_or((content_type, ""));
    if !media_type
        .trim()
        .eq_ignore_ascii_case("multipart/form-data")
    {
        return Err(MultipartError::NotFormData {
            content_type: content_type.to_string(),
        });
    }
    let bad = |why: String| MultipartError::BadBoundary { why };
    let params =
        parameters(params).map_err(|why| bad(format!("has malformed parameters: {why}")))?;
    let Some((_, boundary)) = params.into_iter().find(|(name, _)| name == "boundary") else {
        return Err(bad("has no boundary parameter".into()));
    };
    if boundary.is_empty() {
        return Err(bad("has an empty boundary".into()));
    }
    if boundary.len() > MAX_BOUNDARY_BYTES {
        return Err(bad(format!(
            "has a boundary longer than {MAX_BOUNDARY_BYTES} characters"
        )));
    }
    if boundary.chars().any(char::is_control) {
        return Err(bad("has control characters in its boundary".into()));
    }
    Ok(boundary)
}

/// The parts of `body`, delimited by `boundary` (as [`boundary`] returns it). A preamble before
/// the first delimiter and an epilogue after the close delimiter are ignored; the boundary
/// inside content ends nothing unless it starts a line and is followed by a line end (after
/// optional spaces or tabs) or `--`.
pub(crate) fn parse<'a>(
    body: &'a [u8],
    boundary: &str,
    limits: &Limits,
) -> Result<Vec<Part<'a>>, MultipartError> {
    let dash_boundary = format!("--{boundary}").into_bytes();
    let (mut delimiter, eol) =
        first_delimiter(body, &dash_boundary).ok_or(MultipartError::NoDelimiter)?;
    let mut parts = Vec::new();
    while !delimiter.is_close {
        let number = parts.len() + 1;
        if number > limits.max_parts {
            return Err(MultipartError::TooManyParts {
                limit: limits.max_parts,
            });
        }
        let (headers, content_start) = read_headers(body, delimiter.end, number, limits)?;
        delimiter = next_delimiter(body, content_start, &dash_boundary, eol)
            .ok_or(MultipartError::Unterminated)?;
        let data = &body[content_start..delimiter.content_end];
        parts.push(make_part(headers, data, number, limits)?);
    }
    Ok(parts)
}

/// A delimiter line found in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Delimiter {
    /// Where the content before it ends (its line end belongs to the delimiter).
    content_end: usize,
    /// Just past its line: where the next part's headers start.
    end: usize,
    /// Whether it is the close delimiter, `--boundary--`.
    is_close: bool,
}

/// The line ending of the standard, and of every client we know.
const CRLF: &[u8] = b"\r\n";
/// The line ending some hand-written clients use; [`first_delimiter`] picks one for the body.
const LF: &[u8] = b"\n";

/// The first delimiter line, at the very start or at the start of a later line (after a
/// preamble), and the line ending it shows the body uses.
fn first_delimiter(body: &[u8], dash_boundary: &[u8]) -> Option<(Delimiter, &'static [u8])> {
    let mut line_starts = std::iter::once(0).chain(
        body.iter()
            .enumerate()
            .filter(|&(_, &b)| b == b'\n')
            .map(|(i, _)| i + 1),
    );
    line_starts.find_map(|start| delimiter_at(body, start, start, dash_boundary, &[CRLF, LF]))
}

/// The delimiter that ends the content starting at `from`: `eol` then a delimiter line.
fn next_delimiter(
    body: &[u8],
    from: usize,
    dash_boundary: &[u8],
    eol: &'static [u8],
) -> Option<Delimiter> {
    let mut search = from;
    while let Some(found) = find(&body[search..], eol).map(|i| search + i) {
        search = found + 1;
        let line = found + eol.len();
        if let Some((delimiter, _)) = delimiter_at(body, line, found, dash_boundary, &[eol]) {
            return Some(delimiter);
        }
    }
    None
}

/// The delimiter line starting at `line`, if there is one: `--boundary`, then `--` (the close
/// delimiter) or optional padding and one of `line_ends`; with the line end it used (for a
/// close delimiter, the first of them).
fn delimiter_at(
    body: &[u8],
    line: usize,
    content_end: usize,
    dash_boundary: &[u8],
    line_ends: &[&'static [u8]],
) -> Option<(Delimiter, &'static [u8])> {
    if !body[line..].starts_with(dash_boundary) {
        return None;
    }
    let after = line + dash_boundary.len();
    if body[after..].starts_with(b"--") {
        let close = Delimiter {
            content_end,
            end: after + 2,
            is_close: true,
        };
        return Some((close, line_ends[0]));
    }
    let padded = after + padding(&body[after..]);
    let eol = line_ends
        .iter()
        .find(|&&eol| body[padded..].starts_with(eol))?;
    let open = Delimiter {
        content_end,
        end: padded + eol.len(),
        is_close: false,
    };
    Some((open, eol))
}

/// Where `needle` (a line end: one or two bytes ending in LF) first occurs in `haystack`.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let lead = needle.len() - 1;
    haystack
        .iter()
        .enumerate()
        .skip(lead)
        .filter(|&(_, &b)| b == b'\n')
        .map(|(i, _)| i - lead)
        .find(|&start| haystack[start..].starts_with(needle))
}

/// How many bytes of transport padding (spaces and tabs) start `bytes`.
fn padding(bytes: &[u8]) -> usize {
    bytes
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count()
}

/// The headers of one part that we use.
#[derive(Debug, Default)]
struct PartHeaders {
    /// The `name` of its Content-Disposition (first header of that name wins).
    name: Option<String>,
    filename: Option<String>,
    content_type: Option<String>,
    /// Whether a Content-Disposition was seen, so a later one is ignored.
    has_disposition: bool,
}

/// Reads the header block of part `part` starting at `at`, up to its blank line; returns the
/// headers and where the content starts. Lines end in CRLF or a bare LF.
fn read_headers(
    body: &[u8],
    at: usize,
    part: usize,
    limits: &Limits,
) -> Result<(PartHeaders, usize), MultipartError> {
    let too_large = MultipartError::HeadersTooLarge {
        part,
        limit: limits.max_header_bytes,
    };
    let block_end = body.len().min(at + limits.max_header_bytes);
    let mut headers = PartHeaders::default();
    let mut pos = at;
    loop {
        let Some(lf) = body[pos..block_end].iter().position(|&b| b == b'\n') else {
            return Err(if block_end < body.len() {
                too_large
            } else {
                MultipartError::Unterminated
            });
        };
        let line = &body[pos..pos + lf];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        pos += lf + 1;
        if line.is_empty() {
            return Ok((headers, pos));
        }
        read_header_line(&mut headers, line, part)?;
    }
}

/// Takes one `Name: value` line into `headers`; names in any case, unknown names ignored.
fn read_header_line(
    headers: &mut PartHeaders,
    line: &[u8],
    part: usize,
) -> Result<(), MultipartError> {
    let bad = |why: String| MultipartError::BadHeader { part, why };
    let line = String::from_utf8_lossy(line);
    let Some((name, value)) = line.split_once(':') else {
        return Err(bad(format!("{line:?} is not a `Name: value` line")));
    };
    let (name, value) = (name.trim(), value.trim());
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(bad(format!("{line:?} has no valid header name")));
    }
    if name.eq_ignore_ascii_case("content-type") && headers.content_type.is_none() {
        headers.content_type = Some(value.to_string());
    } else if name.eq_ignore_ascii_case("content-disposition") && !headers.has_disposition {
        headers.has_disposition = true;
        let (kind, params) = value.split_once(';').unwrap_or((value, ""));
        if !kind.trim().eq_ignore_ascii_case("form-data") {
            return Err(bad(format!(
                "its Content-Disposition is {:?}, not form-data",
                kind.trim()
            )));
        }
        let params =
            parameters(params).map_err(|why| bad(format!("its Content-Disposition has {why}")))?;
        let param = |wanted: &str| {
            params
                .iter()
                .find(|(n, _)| n == wanted)
                .map(|(_, v)| v.clone())
        };
        headers.name = param("name");
        headers.filename = param("filename*")
            .and_then(|v| ext_value(&v))
            .or_else(|| param("filename"));
    }
    Ok(())
}

/// A part from its headers and content, once its name and size pass.
fn make_part<'a>(
    headers: PartHeaders,
    data: &'a [u8],
    part: usize,
    limits: &Limits,
) -> Result<Part<'a>, MultipartError> {
    let name = headers.name.ok_or(MultipartError::MissingName { part })?;
    let limit = if name == FILE_FIELD {
        limits.max_file_bytes
    } else {
        limits.max_field_bytes
    };
    if data.len() > limit {
        return Err(MultipartError::PartTooLarge { name, limit });
    }
    Ok(Part {
        name,
        filename: headers.filename,
        content_type: headers.content_type,
        data,
    })
}

/// The `; name=value` parameters after a header value's first item, names lower-cased, in
/// order. A value is a quoted string or runs to the next `;`, trimmed. In a quoted string a
/// backslash escapes only `"` and `\`: any other backslash is kept, so a Windows path some
/// browsers send (`C:\dir\a.txt`) survives. The error completes "… has {why}".
fn parameters(text: &str) -> Result<Vec<(String, String)>, &'static str> {
    let mut params = Vec::new();
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches(|c: char| c == ';' || c.is_ascii_whitespace());
        if rest.is_empty() {
            return Ok(params);
        }
        let name_end = rest.find([';', '=']).unwrap_or(rest.len());
        let Some(after) = rest[name_end..].strip_prefix('=') else {
            return Err("a parameter without a value");
        };
        let name = rest[..name_end].trim();
        if name.is_empty() || name.contains(|c: char| c.is_ascii_whitespace()) {
            return Err("a parameter without a name");
        }
        let after = after.trim_start();
        let (value, left) = if let Some(quoted) = after.strip_prefix('"') {
            let (value, left) = unquote(quoted).ok_or("an unterminated quoted string")?;
            let left = left.trim_start();
            if !(left.is_empty() || left.starts_with(';')) {
                return Err("text after a quoted value");
            }
            (value, left)
        } else {
            let end = after.find(';').unwrap_or(after.len());
            (after[..end].trim_end().to_string(), &after[end..])
        };
        params.push((name.to_ascii_lowercase(), value));
        rest = left;
    }
}

/// The value of a quoted string whose opening quote is already taken, and the text after its
/// closing quote; `None` when it never closes.
fn unquote(text: &str) -> Option<(String, &str)> {
    let mut value = String::new();
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((value, &text[i + 1..])),
            '\\' if matches!(chars.peek(), Some((_, '"' | '\\'))) => {
                let (_, escaped) = chars.next()?;
                value.push(escaped);
            }
            _ => value.push(c),
        }
    }
    None
}

/// An RFC 5987 extended value, `UTF-8''percent%20encoded` (or ISO-8859-1); `None` when it
/// does not decode, so the plain `filename` is used instead.
fn ext_value(value: &str) -> Option<String> {
    let mut pieces = value.splitn(3, '\'');
    let (charset, _language, encoded) = (pieces.next()?, pieces.next()?, pieces.next()?);
    let bytes: Vec<u8> = percent_encoding::percent_decode_str(encoded).collect();
    if charset.eq_ignore_ascii_case("utf-8") {
        String::from_utf8(bytes).ok()
    } else if charset.eq_ignore_ascii_case("iso-8859-1") {
        Some(bytes.into_iter().map(char::from).collect())
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines joined by CRLF, as every real client sends them.
    fn crlf(lines: &[&str]) -> Vec<u8> {
        lines.join("\r\n").into_bytes()
    }

    fn parse_all<'a>(body: &'a [u8], boundary: &str) -> Result<Vec<Part<'a>>, MultipartError> {
        parse(body, boundary, &Limits::new(1024 * 1024))
    }

    /// A one-part upload named `file` around `content`.
    fn upload(boundary: &str, content: &[u8]) -> Vec<u8> {
        let mut body = crlf(&[
            &format!("--{boundary}"),
            r#"Content-Disposition: form-data; name="file"; filename="f.bin""#,
            "Content-Type: application/octet-stream",
            "",
            "",
        ]);
        body.extend_from_slice(content);
        body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
        body
    }

    #[test]
    fn boundary_is_read_from_an_unquoted_parameter_in_any_case() {
        for header in [
            "multipart/form-data; boundary=----abc",
            "Multipart/Form-Data;BOUNDARY=----abc",
            "multipart/form-data ; charset=utf-8 ;  boundary = ----abc ; x=y",
            "multipart/form-data; boundary=----abc;",
        ] {
            assert_eq!(boundary(header).unwrap(), "----abc", "{header}");
        }
    }

    #[test]
    fn boundary_may_be_quoted_with_special_characters_and_escapes() {
        let header = r#"multipart/form-data; boundary="a b;c"; charset="utf-8""#;
        assert_eq!(boundary(header).unwrap(), "a b;c");
        let escaped = r#"multipart/form-data; boundary="q\"uo\\te""#;
        assert_eq!(boundary(escaped).unwrap(), r#"q"uo\te"#);
    }

    #[test]
    fn boundary_is_refused_when_missing_empty_too_long_or_not_form_data() {
        let long = format!("multipart/form-data; boundary={}", "x".repeat(71));
        assert_eq!(boundary(&long[..long.len() - 1]).unwrap().len(), 70);
        for header in [
            "multipart/form-data",
            "multipart/form-data; charset=utf-8",
            "multipart/form-data; boundary=",
            r#"multipart/form-data; boundary="""#,
            r#"multipart/form-data; boundary="unterminated"#,
            "multipart/form-data; boundary",
            &long,
        ] {
            let err = boundary(header).unwrap_err();
            assert!(
                matches!(err, MultipartError::BadBoundary { .. }),
                "{header}"
            );
            assert!(!err.is_too_large());
        }
        for header in ["application/json", "multipart/mixed; boundary=abc", ""] {
            assert!(matches!(
                boundary(header),
                Err(MultipartError::NotFormData { .. })
            ));
        }
        assert_eq!(
            boundary("multipart/form-data").unwrap_err().to_string(),
            "the multipart/form-data Content-Type has no boundary parameter"
        );
    }

    #[test]
    fn an_upload_from_the_openai_python_sdk_parses() {
        // httpx: 32 hex characters, a text field, then the file with its own Content-Type.
        let content_type = "multipart/form-data; boundary=0d3c5e8f9a1b4c2d8e7f6a5b4c3d2e1f";
        let body = crlf(&[
            "--0d3c5e8f9a1b4c2d8e7f6a5b4c3d2e1f",
            r#"Content-Disposition: form-data; name="purpose""#,
            "",
            "assistants",
            "--0d3c5e8f9a1b4c2d8e7f6a5b4c3d2e1f",
            r#"Content-Disposition: form-data; name="file"; filename="notes.txt""#,
            "Content-Type: text/plain",
            "",
            "first line",
            "second line",
            "--0d3c5e8f9a1b4c2d8e7f6a5b4c3d2e1f--",
            "",
        ]);
        let parts = parse_all(&body, &boundary(content_type).unwrap()).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(
            field(&parts, "purpose").unwrap().text().unwrap(),
            "assistants"
        );
        assert_eq!(field(&parts, "purpose").unwrap().filename, None);
        let file = field(&parts, "file").unwrap();
        assert_eq!(file.filename.as_deref(), Some("notes.txt"));
        assert_eq!(file.content_type.as_deref(), Some("text/plain"));
        assert_eq!(file.data, b"first line\r\nsecond line");
        assert!(field(&parts, "missing").is_none());
    }

    #[test]
    fn an_upload_from_curl_parses() {
        // curl -F purpose=assistants -F file=@notes.md
        let content_type = "multipart/form-data; boundary=------------------------abcdef0123456789";
        let body = crlf(&[
            "--------------------------abcdef0123456789",
            r#"Content-Disposition: form-data; name="purpose""#,
            "",
            "assistants",
            "--------------------------abcdef0123456789",
            r#"Content-Disposition: form-data; name="file"; filename="notes.md""#,
            "Content-Type: application/octet-stream",
            "",
            "# Notes",
            "",
            "- one",
            "",
            "--------------------------abcdef0123456789--",
            "",
        ]);
        let parts = parse_all(&body, &boundary(content_type).unwrap()).unwrap();
        let file = field(&parts, "file").unwrap();
        assert_eq!(file.filename.as_deref(), Some("notes.md"));
        assert_eq!(
            file.content_type.as_deref(),
            Some("application/octet-stream")
        );
        assert_eq!(file.data, b"# Notes\r\n\r\n- one\r\n");
        assert_eq!(parts[0].text().unwrap(), "assistants");
    }

    #[test]
    fn the_boundary_inside_content_ends_nothing_unless_it_starts_a_delimiter_line() {
        let content: &[u8] = b"xx--B0undary mid-line --B0undary\r\n\
            B0undary at a line start without dashes\r\n\
            --B0undaryX is a longer word\r\n\
            --B0undary followed by text\r\n\
            bare LF then it:\n--B0undary\r\n\
            tail";
        let body = upload("B0undary", content);
        let parts = parse_all(&body, "B0undary").unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].data, content);
    }

    #[test]
    fn binary_content_keeps_every_byte() {
        let content: &[u8] = b"\0\x01\r\n\r\r\n\n\xff\xfe--\r\n\0 ends in CR LF\r\n";
        let body = upload("bin", content);
        let parts = parse_all(&body, "bin").unwrap();
        assert_eq!(parts[0].data, content);
        assert!(parts[0].text().is_err());
    }

    #[test]
    fn an_empty_file_is_a_part_with_no_bytes() {
        let body = upload("b", b"");
        let parts = parse_all(&body, "b").unwrap();
        assert_eq!(parts[0].name, "file");
        assert_eq!(parts[0].data, b"");
    }

    #[test]
    fn a_preamble_an_epilogue_and_transport_padding_are_ignored() {
        let body = crlf(&[
            "This is a preamble --b that mentions the boundary.",
            "--b \t",
            r#"Content-Disposition: form-data; name="a""#,
            "",
            "one",
            "--b\t",
            r#"Content-Disposition: form-data; name="b""#,
            "",
            "two",
            "--b-- ",
            "an epilogue",
            "--b",
            "not a part",
        ]);
        let parts = parse_all(&body, "b").unwrap();
        let texts: Vec<&str> = parts.iter().map(|p| p.text().unwrap()).collect();
        assert_eq!(texts, ["one", "two"]);
    }

    #[test]
    fn a_body_with_only_a_close_delimiter_has_no_parts() {
        assert_eq!(parse_all(b"--b--\r\n", "b").unwrap(), []);
    }

    #[test]
    fn bare_lf_line_endings_are_read_throughout() {
        let body = b"--b\nContent-Disposition: form-data; name=\"purpose\"\n\nassistants\n\
            --b\ncontent-disposition: form-data; name=\"file\"; filename=\"a.txt\"\n\n\
            line\r\n--b--\n";
        let parts = parse_all(body, "b").unwrap();
        assert_eq!(parts[0].text().unwrap(), "assistants");
        // In a bare-LF body a CR before the delimiter is content.
        assert_eq!(parts[1].data, b"line\r");
    }

    #[test]
    fn a_body_without_its_closing_boundary_is_refused() {
        let whole = upload("b", b"content");
        for cut in [
            &whole[..whole.len() - 4], // "--b" with no "--"
            &whole[..whole.len() - 8], // inside the last delimiter
            b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nno end",
            b"--b\r\nContent-Disposition: form-data; name=\"a\"\r\n", // inside the headers
            b"--b\r\n",
        ] {
            let err = parse_all(cut, "b").unwrap_err();
            assert_eq!(
                err,
                MultipartError::Unterminated,
                "{:?}",
                String::from_utf8_lossy(cut)
            );
            assert!(!err.is_too_large());
        }
        assert_eq!(
            MultipartError::Unterminated.to_string(),
            "the multipart body ends before its closing boundary"
        );
    }

    #[test]
    fn a_body_without_the_boundary_is_refused() {
        let body = upload("right", b"x");
        assert_eq!(
            parse_all(&body, "wrong").unwrap_err(),
            MultipartError::NoDelimiter
        );
        assert_eq!(
            parse_all(b"", "b").unwrap_err(),
            MultipartError::NoDelimiter
        );
    }

    #[test]
    fn a_part_without_a_name_is_refused() {
        for headers in [
            "Content-Disposition: form-data; filename=\"a.txt\"",
            "Content-Type: text/plain",
            "",
        ] {
            let body = format!("--b\r\n{headers}\r\n\r\nx\r\n--b--\r\n");
            let err = parse_all(body.as_bytes(), "b").unwrap_err();
            assert_eq!(err, MultipartError::MissingName { part: 1 }, "{headers}");
        }
        assert_eq!(
            MultipartError::MissingName { part: 2 }.to_string(),
            "part 2 of the multipart body has no name in its Content-Disposition header"
        );
    }

    #[test]
    fn malformed_part_headers_are_refused() {
        for headers in [
            "Content-Disposition form-data; name=\"a\"",
            "Content-Disposition: attachment; name=\"a\"",
            "Content-Disposition: form-data; name=\"a",
            "Content-Disposition: form-data; name",
        ] {
            let body = format!("--b\r\n{headers}\r\n\r\nx\r\n--b--\r\n");
            let err = parse_all(body.as_bytes(), "b").unwrap_err();
            assert!(
                matches!(err, MultipartError::BadHeader { part: 1, .. }),
                "{headers}: {err}"
            );
        }
    }

    #[test]
    fn a_part_over_its_limit_is_too_large() {
        let limits = Limits::new(10);
        let body = upload("b", &[b'a'; 11]);
        let err = parse(&body, "b", &limits).unwrap_err();
        assert!(err.is_too_large());
        assert_eq!(err.to_string(), "part 'file' is larger than 10 bytes");
        let body = upload("b", &[b'a'; 10]);
        assert_eq!(parse(&body, "b", &limits).unwrap()[0].data.len(), 10);

        // Any other field is held to max_field_bytes, however large the upload may be.
        let limits = Limits::new(1 << 20);
        let big = "p".repeat(MAX_FIELD_BYTES + 1);
        let body = crlf(&[
            "--b",
            r#"Content-Disposition: form-data; name="purpose""#,
            "",
            &big,
            "--b--",
        ]);
        let err = parse(&body, "b", &limits).unwrap_err();
        assert_eq!(
            err,
            MultipartError::PartTooLarge {
                name: "purpose".into(),
                limit: MAX_FIELD_BYTES
            }
        );
    }

    #[test]
    fn more_parts_than_the_limit_are_too_large() {
        let one = "--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nv\r\n";
        let body = format!("{}--b--\r\n", one.repeat(MAX_PARTS));
        assert_eq!(parse_all(body.as_bytes(), "b").unwrap().len(), MAX_PARTS);
        let body = format!("{}--b--\r\n", one.repeat(MAX_PARTS + 1));
        let err = parse_all(body.as_bytes(), "b").unwrap_err();
        assert_eq!(err, MultipartError::TooManyParts { limit: MAX_PARTS });
        assert!(err.is_too_large());
        assert_eq!(err.to_string(), "the multipart body has more than 16 parts");
    }

    #[test]
    fn headers_over_their_limit_are_too_large() {
        let long = format!("X-Padding: {}", "p".repeat(MAX_HEADER_BYTES));
        let body = crlf(&[
            "--b",
            r#"Content-Disposition: form-data; name="a""#,
            &long,
            "",
            "x",
            "--b--",
        ]);
        let err = parse_all(&body, "b").unwrap_err();
        assert_eq!(
            err,
            MultipartError::HeadersTooLarge {
                part: 1,
                limit: MAX_HEADER_BYTES
            }
        );
        assert!(err.is_too_large());
    }

    #[test]
    fn unquoted_parameters_and_header_names_in_any_case_are_read() {
        let body = crlf(&[
            "--b",
            "CONTENT-DISPOSITION: Form-Data;NAME=file ; FileName=my notes.txt",
            "content-type:text/markdown; charset=utf-8",
            "X-Ignored: yes",
            "",
            "x",
            "--b--",
        ]);
        let parts = parse_all(&body, "b").unwrap();
        assert_eq!(parts[0].name, "file");
        assert_eq!(parts[0].filename.as_deref(), Some("my notes.txt"));
        assert_eq!(
            parts[0].content_type.as_deref(),
            Some("text/markdown; charset=utf-8")
        );
    }

    #[test]
    fn filename_star_is_preferred_over_filename() {
        let disposition = |params: &str| {
            let body = format!(
                "--b\r\nContent-Disposition: form-data; name=\"file\"; {params}\r\n\r\nx\r\n--b--"
            );
            let parts = parse_all(body.as_bytes(), "b").unwrap();
            parts[0].filename.clone()
        };
        assert_eq!(
            disposition(r#"filename="plain.txt"; filename*=UTF-8''na%C3%AFve%20notes.txt"#),
            Some("naïve notes.txt".into())
        );
        assert_eq!(
            disposition(r#"filename*=utf-8'en'r%C3%A9sum%C3%A9.md; filename="resume.md""#),
            Some("résumé.md".into())
        );
        assert_eq!(
            disposition("filename*=iso-8859-1''caf%E9.txt"),
            Some("café.txt".into())
        );
        // An extended value that does not decode leaves the plain one.
        assert_eq!(
            disposition(r#"filename="plain.txt"; filename*=UTF-8''%FF.txt"#),
            Some("plain.txt".into())
        );
        assert_eq!(
            disposition(r#"filename="plain.txt"; filename*=koi8-r''x.txt"#),
            Some("plain.txt".into())
        );
    }

    #[test]
    fn quoted_filenames_unescape_quotes_and_keep_other_backslashes() {
        let body = crlf(&[
            "--b",
            r#"Content-Disposition: form-data; name="file"; filename="say \"hi\" \\ C:\dir\a;b.txt""#,
            "",
            "x",
            "--b--",
        ]);
        let parts = parse_all(&body, "b").unwrap();
        assert_eq!(
            parts[0].filename.as_deref(),
            Some(r#"say "hi" \ C:\dir\a;b.txt"#)
        );
    }

    #[test]
    fn a_field_that_is_not_utf8_is_refused_as_text() {
        let body = b"--b\r\nContent-Disposition: form-data; name=purpose\r\n\r\n\xff\xfe\r\n--b--";
        let parts = parse_all(body, "b").unwrap();
        let err = parts[0].text().unwrap_err();
        assert_eq!(err.to_string(), "part 'purpose' is not UTF-8 text");
        assert!(!err.is_too_large());
    }
}
