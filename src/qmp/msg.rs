//! QMP messages: the greeting, events with their timestamps, and error replies.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The server's greeting: `{"QMP": {"version": ..., "capabilities": [...]}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Greeting {
    /// The greeting body.
    #[serde(rename = "QMP")]
    pub qmp: GreetingBody,
}

/// The body of a [`Greeting`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GreetingBody {
    /// QEMU's version.
    pub version: VersionInfo,
    /// Capabilities the server offers (e.g. "oob").
    #[serde(default)]
    pub capabilities: Vec<String>,
}

/// QEMU's version, as in the greeting and `query-version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// Upstream version numbers.
    pub qemu: VersionTriple,
    /// The distribution's package string.
    #[serde(default)]
    pub package: String,
}

/// major.minor.micro.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VersionTriple {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

impl fmt::Display for VersionTriple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// When an event happened: seconds and microseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timestamp {
    /// Whole seconds.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl Timestamp {
    /// The time as a [`SystemTime`]; `None` for QEMU's "no time" (-1) or values out of
    /// range.
    pub fn to_system_time(self) -> Option<SystemTime> {
        if self.seconds < 0 || !(0..1_000_000).contains(&self.microseconds) {
            return None;
        }
        UNIX_EPOCH.checked_add(Duration::new(self.seconds as u64, self.microseconds as u32 * 1000))
    }
}

/// An asynchronous event: `{"event": NAME, "data": {...}, "timestamp": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The event's name (SHUTDOWN, POWERDOWN, STOP, ...).
    pub event: String,
    /// Its data, `null` when there is none.
    #[serde(default)]
    pub data: Value,
    /// When it happened.
    pub timestamp: Timestamp,
}

/// The body of an error reply: `{"error": {"class": ..., "desc": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error class (GenericError, CommandNotFound, DeviceNotFound, ...).
    pub class: String,
    /// The human-readable description.
    pub desc: String,
}

/// What one line from the server is.
#[derive(Debug)]
pub(crate) enum Incoming {
    Greeting(Greeting),
    Event(Event),
    Reply { id: Option<Value>, result: Result<Value, ErrorBody> },
    Malformed(String),
}

/// Classifies one line. Never panics; anything unexpected is `Malformed`.
pub(crate) fn parse_line(line: &[u8]) -> Incoming {
    let v: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return Incoming::Malformed(format!("not JSON: {e}")),
    };
    let Value::Object(mut obj) = v else {
        return Incoming::Malformed("not a JSON object".into());
    };
    if obj.contains_key("QMP") {
        return match serde_json::from_value(Value::Object(obj)) {
            Ok(g) => Incoming::Greeting(g),
            Err(e) => Incoming::Malformed(format!("bad greeting: {e}")),
        };
    }
    if obj.contains_key("event") {
        return match serde_json::from_value(Value::Object(obj)) {
            Ok(e) => Incoming::Event(e),
            Err(e) => Incoming::Malformed(format!("bad event: {e}")),
        };
    }
    let id = obj.remove("id");
    if let Some(ret) = obj.remove("return") {
        return Incoming::Reply { id, result: Ok(ret) };
    }
    if let Some(err) = obj.remove("error") {
        return match serde_json::from_value::<ErrorBody>(err) {
            Ok(body) => Incoming::Reply { id, result: Err(body) },
            // Still an answer to its caller, who must not wait out the timeout for it.
            Err(e) if id.is_some() => Incoming::Reply {
                id,
                result: Err(ErrorBody {
                    class: "MalformedError".into(),
                    desc: format!("unreadable error reply: {e}"),
                }),
            },
            Err(e) => Incoming::Malformed(format!("bad error reply: {e}")),
        };
    }
    Incoming::Malformed("neither greeting, event nor reply".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_convert_seconds_and_microseconds() {
        let t = Timestamp { seconds: 1_795_242_077, microseconds: 673_148 };
        let st = t.to_system_time().unwrap();
        assert_eq!(st.duration_since(UNIX_EPOCH).unwrap(), Duration::new(1_795_242_077, 673_148_000));
        assert_eq!(Timestamp { seconds: -1, microseconds: -1 }.to_system_time(), None);
        assert_eq!(Timestamp { seconds: 1, microseconds: 1_000_000 }.to_system_time(), None);
    }

    #[test]
    fn classifies_lines() {
        let g = br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#;
        match parse_line(g) {
            Incoming::Greeting(g) => {
                assert_eq!(g.qmp.version.qemu.to_string(), "7.2.22");
                assert_eq!(g.qmp.capabilities, ["oob"]);
            }
            other => panic!("{other:?}"),
        }
        let e = br#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": false}}"#;
        assert!(
            matches!(parse_line(e), Incoming::Event(ev) if ev.event == "SHUTDOWN" && ev.data["guest"] == false)
        );
        let r = br#"{"return": {}, "id": 7}"#;
        assert!(matches!(parse_line(r), Incoming::Reply { id: Some(Value::Number(_)), result: Ok(_) }));
        let r = br#"{"error": {"class": "CommandNotFound", "desc": "The command x has not been found"}}"#;
        assert!(matches!(parse_line(r), Incoming::Reply { id: None, result: Err(ErrorBody { .. }) }));
        for bad in [&b"garbage"[..], b"[1]", b"{}", b"{\"event\": 1}", b"{\"error\": 5}", b"\xff\xfe"] {
            assert!(matches!(parse_line(bad), Incoming::Malformed(_)), "{bad:?}");
        }
    }
}
