//! `key=value` text (RFC 7143 §6.1): the data segment of Login and Text
//! PDUs. Pure parsing and encoding with bounded sizes.

/// Longest key accepted (the RFC caps keys at 63 bytes).
pub const MAX_KEY: usize = 63;
/// Longest value accepted (8192 covers CHAP challenges in hex).
pub const MAX_VALUE: usize = 8192;
/// Most pairs accepted in one negotiation step.
pub const MAX_PAIRS: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error("A text pair has no '='")]
    NoEquals,
    #[error("Key or value is not UTF-8")]
    NotUtf8,
    #[error("Key of {0} bytes is too long")]
    KeyTooLong(usize),
    #[error("Value of {0} bytes is too long")]
    ValueTooLong(usize),
    #[error("More than {MAX_PAIRS} keys")]
    TooMany,
    #[error("Key {0} appears twice")]
    Duplicate(String),
}

/// Splits NUL-terminated `key=value` pairs; a missing final NUL is
/// tolerated, empty strings between NULs are skipped.
pub fn parse_text(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for part in data.split(|b| *b == 0) {
        if part.is_empty() {
            continue;
        }
        let eq = part
            .iter()
            .position(|b| *b == b'=')
            .ok_or(TextError::NoEquals)?;
        let (k, v) = (&part[..eq], &part[eq + 1..]);
        if k.is_empty() || k.len() > MAX_KEY {
            return Err(TextError::KeyTooLong(k.len()));
        }
        if v.len() > MAX_VALUE {
            return Err(TextError::ValueTooLong(v.len()));
        }
        let k = std::str::from_utf8(k).map_err(|_| TextError::NotUtf8)?;
        let v = std::str::from_utf8(v).map_err(|_| TextError::NotUtf8)?;
        if out.iter().any(|(ok, _)| ok == k) {
            return Err(TextError::Duplicate(k.to_string()));
        }
        if out.len() == MAX_PAIRS {
            return Err(TextError::TooMany);
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Encodes pairs as `key=value\0...`.
pub fn encode_text(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(k: &str, v: &str) -> (String, String) {
        (k.into(), v.into())
    }

    #[test]
    fn table() {
        type Pairs = Result<Vec<(String, String)>, TextError>;
        let cases: &[(&[u8], Pairs)] = &[
            (b"", Ok(vec![])),
            (b"A=1\0", Ok(vec![p("A", "1")])),
            (b"A=1\0B=\0", Ok(vec![p("A", "1"), p("B", "")])),
            (b"A=1", Ok(vec![p("A", "1")])),
            (b"A=b=c\0", Ok(vec![p("A", "b=c")])),
            (b"\0\0A=1\0\0", Ok(vec![p("A", "1")])),
            (b"A\0", Err(TextError::NoEquals)),
            (b"=1\0", Err(TextError::KeyTooLong(0))),
            (b"A=1\0A=2\0", Err(TextError::Duplicate("A".into()))),
            (b"A=\xff\0", Err(TextError::NotUtf8)),
        ];
        for (input, want) in cases {
            assert_eq!(&parse_text(input), want, "{input:?}");
        }
        let long = format!("{}=1", "k".repeat(64));
        assert_eq!(parse_text(long.as_bytes()), Err(TextError::KeyTooLong(64)));
    }

    #[test]
    fn round_trip() {
        let pairs = vec![
            p("TargetName", "iqn.x:y"),
            p("TargetAddress", "1.2.3.4:3260,1"),
        ];
        assert_eq!(parse_text(&encode_text(&pairs)).unwrap(), pairs);
    }
}
