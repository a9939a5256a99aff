//! JSON helpers shared by the readers of data files and of metrics logs.
use serde_json::Value;

/// "a string", "an object", ...: for messages that say what was found instead.
pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
