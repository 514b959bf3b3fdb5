//! Field-level validation errors.

use std::fmt;

/// One bad field: the path of the field in the request (e.g.
/// `customer.demographics.birth_date`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Dotted path of the field, with `[i]` for repeated elements.
    pub field: String,
    /// Human-readable reason.
    pub description: String,
}

impl Violation {
    /// A violation of `field`.
    pub fn new(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            description: description.into(),
        }
    }

    /// The same violation with `prefix.` put before the field path.
    #[must_use]
    pub fn under(mut self, prefix: &str) -> Self {
        if !prefix.is_empty() {
            self.field = if self.field.is_empty() {
                prefix.to_owned()
            } else {
                format!("{prefix}.{}", self.field)
            };
        }
        self
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.description)
    }
}

impl std::error::Error for Violation {}

/// Several violations collected while checking one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Violations(pub Vec<Violation>);

impl Violations {
    /// No violations yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one violation.
    pub fn push(&mut self, v: Violation) {
        self.0.push(v);
    }

    /// Keeps the value of `r`, recording its violation (under `prefix`) if it failed.
    pub fn check<T>(&mut self, prefix: &str, r: Result<T, Violation>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.0.push(e.under(prefix));
                None
            }
        }
    }

    /// Ok if nothing was recorded.
    pub fn into_result(self) -> Result<(), Violations> {
        if self.0.is_empty() { Ok(()) } else { Err(self) }
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Violation> for Violations {
    fn from(v: Violation) -> Self {
        Self(vec![v])
    }
}

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join("; "))
    }
}

impl std::error::Error for Violations {}

/// Most characters of a caller's value echoed back in an error message.
///
/// Errors travel in gRPC headers, which C-core clients (Python, Node)
/// limit to 16 KB in all: an echoed 20 KB value would hide the real error
/// behind a local `RESOURCE_EXHAUSTED`.
pub const MAX_ECHO_CHARS: usize = 64;

/// `value` quoted (as `{:?}` would) for an error message, cut to
/// [`MAX_ECHO_CHARS`] characters with an ellipsis.
pub fn echo(value: &str) -> String {
    format!("{:?}", shorten(value, MAX_ECHO_CHARS))
}

/// `value` cut to at most `max_chars` characters; a cut value ends with `…`
/// (which counts towards `max_chars`).
pub fn shorten(value: &str, max_chars: usize) -> std::borrow::Cow<'_, str> {
    match value.char_indices().nth(max_chars) {
        None => std::borrow::Cow::Borrowed(value),
        Some(_) => {
            let keep: String = value.chars().take(max_chars.saturating_sub(1)).collect();
            std::borrow::Cow::Owned(format!("{keep}…"))
        }
    }
}

/// Checks a required free-text field: trimmed length within `1..=max` characters.
pub fn required_text(field: &str, value: &str, max: usize) -> Result<String, Violation> {
    let v = value.trim();
    if v.is_empty() {
        return Err(Violation::new(field, "is required"));
    }
    optional_text(field, v, max).map(|s| s.unwrap_or_default())
}

/// Checks an optional free-text field: empty means absent; at most `max` characters.
pub fn optional_text(field: &str, value: &str, max: usize) -> Result<Option<String>, Violation> {
    let v = value.trim();
    if v.is_empty() {
        return Ok(None);
    }
    if v.chars().count() > max {
        return Err(Violation::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    if v.chars().any(char::is_control) {
        return Err(Violation::new(field, "must not contain control characters"));
    }
    Ok(Some(v.to_owned()))
}

/// Checks an idempotency key: empty (none) or 1..=128 visible ASCII characters.
pub fn request_id(field: &str, value: &str) -> Result<Option<String>, Violation> {
    if value.is_empty() {
        return Ok(None);
    }
    if value.len() > 128 || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Violation::new(
            field,
            "must be 1..128 visible ASCII characters",
        ));
    }
    Ok(Some(value.to_owned()))
}

/// Page size rule shared by every list rpc: 0 = `default`, negative is
/// invalid, larger than `max` is clamped to `max`.
pub fn page_size(field: &str, value: i32, default: u32, max: u32) -> Result<u32, Violation> {
    match value {
        v if v < 0 => Err(Violation::new(field, "must not be negative")),
        0 => Ok(default),
        v => Ok((v as u32).min(max)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_size_rules() {
        assert_eq!(page_size("page_size", 0, 50, 1000), Ok(50));
        assert_eq!(page_size("page_size", 5000, 50, 1000), Ok(1000));
        assert_eq!(
            page_size("page_size", -1, 50, 1000).unwrap_err().field,
            "page_size"
        );
    }

    #[test]
    fn text_rules() {
        assert_eq!(optional_text("f", "  ", 3), Ok(None));
        assert!(optional_text("f", "abcd", 3).is_err());
        assert!(required_text("f", "", 3).is_err());
        assert_eq!(required_text("f", " ab ", 3), Ok("ab".to_owned()));
    }

    #[test]
    fn echoes_are_bounded() {
        assert_eq!(echo("ada"), "\"ada\"");
        let long = "é".repeat(20_000);
        let e = echo(&long);
        assert_eq!(
            e.chars().count(),
            MAX_ECHO_CHARS + 2,
            "64 characters and the quotes"
        );
        assert!(e.ends_with("…\""), "{e}");
        assert_eq!(shorten("abc", 3), "abc");
        assert_eq!(shorten("abcd", 3), "ab…");
    }

    #[test]
    fn prefixing() {
        let v = Violation::new("email", "bad").under("customer");
        assert_eq!(v.field, "customer.email");
    }
}
