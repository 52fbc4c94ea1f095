//! JSON request bodies: parsed with the path of the first bad field in the error, so
//! a client learns exactly what to fix.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use warp::Filter;

use crate::error::ApiError;

/// Extracts the query string as `T` (an absent one as empty). A wrong type, a bad value or
/// an unknown field (for types with `deny_unknown_fields`) becomes a 400 `invalid_query`
/// that says which, where warp's own query filter says only "Invalid query string".
pub fn query<T: DeserializeOwned + Send + 'static>() -> impl Filter<Extract = (T,), Error = warp::Rejection> + Clone {
    warp::query::raw().or(warp::any().map(String::new)).unify().and_then(|raw: String| async move {
        serde_urlencoded::from_str::<T>(&raw).map_err(|err| {
            warp::reject::custom(ApiError::bad_request("invalid_query", format!("invalid query string: {err}")))
        })
    })
}

/// Extracts a JSON body of type `T` no larger than `limit_bytes`. Malformed JSON, a
/// wrong type or an unknown field (for types with `deny_unknown_fields`) becomes a 400
/// that names the field.
pub fn json_body<T: DeserializeOwned + Send>(
    limit_bytes: u64,
) -> impl Filter<Extract = (T,), Error = warp::Rejection> + Clone {
    warp::header::optional::<String>("content-type").and(warp::body::bytes()).and_then(
        move |content_type: Option<String>, body: Bytes| async move {
            if let Some(content_type) = content_type
                && !content_type.trim_start().to_ascii_lowercase().starts_with("application/json")
            {
                return Err(warp::reject::custom(ApiError::new(
                    http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "invalid_request_error",
                    "unsupported_media_type",
                    format!("content-type `{content_type}` is not supported: send application/json"),
                )));
            }
            if body.len() as u64 > limit_bytes {
                return Err(warp::reject::custom(ApiError::payload_too_large(limit_bytes)));
            }
            parse_json(&body).map_err(warp::reject::custom)
        },
    )
}

/// Parses JSON, naming the path of the first bad field in the error.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let deserializer = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad_request("invalid_json", format!("request body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::bad_request("invalid_request", format!("invalid request body: {inner}"))
        } else {
            ApiError::bad_request("invalid_request", format!("invalid value at `{path}`: {inner}")).with_param(path)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Request {
        model: String,
        messages: Vec<Message>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Message {
        role: String,
        content: String,
    }

    #[test]
    fn errors_name_the_bad_field() {
        let table: [(&str, &str, Option<&str>); 5] = [
            ("{", "invalid_json", None),
            ("[]", "invalid_request", None),
            (r#"{"model": 1, "messages": []}"#, "invalid_request", Some("model")),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": 5}]}"#,
                "invalid_request",
                Some("messages[0].content"),
            ),
            (r#"{"model": "m", "messages": [], "bogus": true}"#, "invalid_request", Some("bogus")),
        ];
        for (body, code, param) in table {
            let err = parse_json::<Request>(body.as_bytes()).unwrap_err();
            assert_eq!(err.status, http::StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(err.code, code, "{body}: {}", err.message);
            assert_eq!(err.param.as_deref(), param, "{body}: {}", err.message);
        }
        let unknown = parse_json::<Request>(br#"{"model": "m", "messages": [], "bogus": true}"#).unwrap_err();
        assert!(unknown.message.contains("bogus"), "{}", unknown.message);
    }
}
