//! Chat templates: the Jinja `chat_template` of `tokenizer_config.json` (or GGUF's
//! `tokenizer.chat_template`), rendered with minijinja the way Hugging Face renders it
//! (`trim_blocks`, `lstrip_blocks`, `raise_exception`, Python string methods, `tojson`,
//! `strftime_now`). Without a template, a plain `role: content` transcript.

use std::fmt::Write;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value, context};

use crate::error::{EngineError, Result};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

const TEMPLATE_NAME: &str = "chat";

/// The fallback when a model has no template: the model's BOS token (a rendered prompt is
/// tokenised without adding special tokens, so a template must hold it, as real ones do),
/// one `role: content` line per message, then `assistant:` when a reply is wanted.
pub const PLAIN_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}\
{% if add_generation_prompt %}assistant:{% endif %}";

/// A compiled chat template with the model's special tokens.
pub struct ChatTemplate {
    environment: Environment<'static>,
    /// The Jinja source as the model gave it (`None`: [`PLAIN_TEMPLATE`]).
    source: Option<String>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source` (a Jinja template as Hugging Face writes them). `None` gives
    /// [`PLAIN_TEMPLATE`].
    pub fn new(source: Option<&str>, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut environment = Environment::new();
        environment.set_trim_blocks(true);
        environment.set_lstrip_blocks(true);
        environment.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        environment.add_function("raise_exception", raise_exception);
        environment.add_function("strftime_now", strftime_now);
        environment.add_filter("tojson", tojson);
        environment
            .add_template_owned(TEMPLATE_NAME, source.unwrap_or(PLAIN_TEMPLATE).to_owned())
            .map_err(|e| EngineError::Template(format!("the chat template does not compile: {e:#}")))?;
        Ok(ChatTemplate {
            environment,
            source: source.map(str::to_owned),
            bos_token: bos_token.unwrap_or_default().to_owned(),
            eos_token: eos_token.unwrap_or_default().to_owned(),
        })
    }

    /// The template's source (`None` for the plain transcript) and its special tokens,
    /// from which [`ChatTemplate::new`] builds the same template elsewhere.
    pub fn parts(&self) -> (Option<&str>, &str, &str) {
        (self.source.as_deref(), &self.bos_token, &self.eos_token)
    }

    /// Renders a conversation; `add_generation_prompt` opens the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template =
            self.environment.get_template(TEMPLATE_NAME).map_err(|e| EngineError::Template(e.to_string()))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidOperation => EngineError::BadRequest(format!(
                    "the chat template refused the conversation: {}",
                    e.detail().unwrap_or("")
                )),
                _ => EngineError::Template(format!("{e:#}")),
            })
    }
}

/// Templates call `raise_exception("...")` to refuse a conversation (a bad role order).
fn raise_exception(message: &str) -> std::result::Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.to_owned()))
}

/// `tojson` as Hugging Face's Jinja has it (Python's `json.dumps`): keys in their order,
/// `", "` and `": "` separators (`","` with an indent), non-ASCII kept, no HTML escaping.
// minijinja hands keyword arguments over by value.
#[allow(clippy::needless_pass_by_value)]
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&mut out, value, indent, 0)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(out: &mut String, value: &Value, indent: Option<usize>, depth: usize) -> std::result::Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(width) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * depth));
        }
    };
    let separator = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&value.to_string()),
        ValueKind::String => {
            out.push_str(&serde_json::to_string(value.as_str().unwrap_or_default()).unwrap_or_default());
        }
        ValueKind::Map => {
            out.push('{');
            let mut first = true;
            for key in value.try_iter()? {
                if !first {
                    out.push_str(separator);
                }
                first = false;
                newline(out, depth + 1);
                let name = key.as_str().map_or_else(|| key.to_string(), str::to_owned);
                out.push_str(&serde_json::to_string(&name).unwrap_or_default());
                out.push_str(": ");
                write_json(out, &value.get_item(&key)?, indent, depth + 1)?;
            }
            if !first {
                newline(out, depth);
            }
            out.push('}');
        }
        _ => {
            out.push('[');
            let mut first = true;
            for item in value.try_iter()? {
                if !first {
                    out.push_str(separator);
                }
                first = false;
                newline(out, depth + 1);
                write_json(out, &item, indent, depth + 1)?;
            }
            if !first {
                newline(out, depth);
            }
            out.push(']');
        }
    }
    Ok(())
}

/// `strftime_now(format)`, which Llama 3 templates use for today's date. Supports the
/// common directives (`%d %m %Y %y %b %B %H %M %S %%`); dates are UTC.
fn strftime_now(format: &str) -> String {
    let seconds =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_secs());
    format_utc(seconds, format)
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Formats seconds since the Unix epoch as UTC with strftime-like directives.
pub(crate) fn format_utc(seconds: u64, format: &str) -> String {
    let days = seconds / 86_400;
    let in_day = seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let month_name = MONTHS[usize::try_from(month - 1).unwrap_or(0) % 12];
        // Writing to a String cannot fail.
        let _ = match chars.next() {
            Some('d') => write!(out, "{day:02}"),
            Some('m') => write!(out, "{month:02}"),
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year % 100),
            Some('b') => write!(out, "{}", &month_name[..3]),
            Some('B') => write!(out, "{month_name}"),
            Some('H') => write!(out, "{:02}", in_day / 3600),
            Some('M') => write!(out, "{:02}", in_day % 3600 / 60),
            Some('S') => write!(out, "{:02}", in_day % 60),
            Some('%') | None => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
        };
    }
    out
}

/// Year, month (1-12) and day (1-31) of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_format_like_strftime() {
        // 2026-11-26 13:05:09 UTC.
        let seconds = 1_795_698_309;
        assert_eq!(format_utc(seconds, "%d %b %Y %H:%M:%S %%"), "26 Nov 2026 13:05:09 %");
        assert_eq!(format_utc(0, "%Y-%m-%d %B"), "1970-01-01 January");
    }
}
