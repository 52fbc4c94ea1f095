//! `response_format`: OpenAI's `{"type": "text"}`, `{"type": "json_object"}` and
//! `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`. The schema is
//! compiled when the request arrives (a bad schema is a 400 naming the problem); the
//! answer is checked when it is complete: valid JSON, an object for `json_object`, and an
//! instance of the schema for `json_schema`. An answer that fails is a 422
//! (`response_format_failed`) saying where it failed, with the start of the answer; a
//! streamed answer ends with that error as its last event before `[DONE]`.

use std::sync::Arc;

use maas_engine::FinishReason;
use serde::Deserialize;
use serde_json::Value;

use crate::error::ApiError;

/// The request's `response_format`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchemaSpec },
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JsonSchemaSpec {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// A JSON Schema the answer must satisfy.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub schema: Option<Value>,
    #[serde(default)]
    pub strict: Option<bool>,
}

/// What the answer must be.
#[derive(Clone)]
pub enum Expected {
    Object,
    Schema { name: String, validator: Arc<jsonschema::Validator> },
}

impl std::fmt::Debug for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expected::Object => f.write_str("Expected::Object"),
            Expected::Schema { name, .. } => write!(f, "Expected::Schema({name})"),
        }
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_response_format", message).with_param("response_format")
}

/// Checks `response_format` and compiles its schema. None: any text.
pub fn expected(format: Option<&ResponseFormat>) -> Result<Option<Expected>, ApiError> {
    match format {
        None | Some(ResponseFormat::Text) => Ok(None),
        Some(ResponseFormat::JsonObject) => Ok(Some(Expected::Object)),
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            let name = &json_schema.name;
            if name.is_empty()
                || name.len() > 64
                || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(bad("json_schema.name must be 1 to 64 letters, digits, `_` or `-`"));
            }
            let schema = json_schema.schema.clone().unwrap_or_else(|| serde_json::json!({}));
            if !schema.is_object() && !schema.is_boolean() {
                return Err(bad("json_schema.schema must be a JSON Schema object"));
            }
            let validator = jsonschema::validator_for(&schema)
                .map_err(|err| bad(format!("json_schema.schema is not a valid JSON Schema: {err}")))?;
            Ok(Some(Expected::Schema { name: name.clone(), validator: Arc::new(validator) }))
        }
    }
}

/// The first characters of an answer, for an error message.
fn opening(text: &str) -> String {
    let mut shown: String = text.chars().take(80).collect();
    if shown.len() < text.len() {
        shown.push('…');
    }
    shown
}

impl Expected {
    /// Checks a complete answer.
    pub fn check(&self, text: &str, finish_reason: FinishReason) -> Result<(), ApiError> {
        let failed = |why: String| {
            let hint = if finish_reason == FinishReason::Length {
                "the answer was cut at max_tokens: raise max_tokens"
            } else {
                "ask for JSON in the prompt, lower the temperature, or use a model that follows formats"
            };
            ApiError::new(
                http::StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request_error",
                "response_format_failed",
                format!(
                    "the model's answer does not satisfy response_format: {why} ({hint}); the answer began `{}`",
                    opening(text)
                ),
            )
            .with_param("response_format")
        };
        let value: Value = serde_json::from_str(text.trim()).map_err(|err| failed(format!("it is not JSON: {err}")))?;
        match self {
            Expected::Object => {
                if !value.is_object() {
                    return Err(failed("it is JSON but not an object".into()));
                }
            }
            Expected::Schema { name, validator } => {
                if let Some(error) = validator.iter_errors(&value).next() {
                    let at = error.instance_path().to_string();
                    let at = if at.is_empty() { "/".to_owned() } else { at };
                    return Err(failed(format!("it does not match schema `{name}` at {at}: {error}")));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn format(value: Value) -> Result<Option<Expected>, ApiError> {
        let parsed: ResponseFormat = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        expected(Some(&parsed))
    }

    #[test]
    fn json_object_takes_objects_only() {
        let expected = format(json!({"type": "json_object"})).unwrap().unwrap();
        assert!(expected.check(" {\"a\": 1}\n", FinishReason::Stop).is_ok());
        let err = expected.check("[1, 2]", FinishReason::Stop).unwrap_err();
        assert_eq!(err.status, http::StatusCode::UNPROCESSABLE_ENTITY);
        assert!(err.message.contains("not an object"), "{}", err.message);
        let err = expected.check("{\"a\": ", FinishReason::Length).unwrap_err();
        assert!(err.message.contains("not JSON") && err.message.contains("raise max_tokens"), "{}", err.message);
    }

    #[test]
    fn a_schema_is_enforced_and_the_failure_located() {
        let schema = json!({"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]});
        let expected =
            format(json!({"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": true}}))
                .unwrap()
                .unwrap();
        assert!(expected.check("{\"age\": 41}", FinishReason::Stop).is_ok());
        let err = expected.check("{\"age\": \"old\"}", FinishReason::Stop).unwrap_err();
        assert!(err.message.contains("schema `person` at /age"), "{}", err.message);
        let err = expected.check("{}", FinishReason::Stop).unwrap_err();
        assert!(err.message.contains("age"), "{}", err.message);
    }

    #[test]
    fn bad_formats_are_refused_up_front() {
        for (value, needle) in [
            (json!({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}), "json_schema.name"),
            (
                json!({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}),
                "not a valid JSON Schema",
            ),
            (
                json!({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}),
                "must be a JSON Schema object",
            ),
            (json!({"type": "yaml"}), "unknown variant"),
        ] {
            let err = format(value).unwrap_err();
            assert_eq!(err.status, http::StatusCode::BAD_REQUEST);
            assert!(err.message.contains(needle), "{needle}: {}", err.message);
        }
        assert!(format(json!({"type": "text"})).unwrap().is_none());
    }
}
