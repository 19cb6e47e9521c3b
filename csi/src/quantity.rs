//! Kubernetes resource quantities (`128Mi`, `1G`, `1.5Gi`, `5e9`) as
//! bytes, and bytes as the quantity the API server keeps.
//!
//! The built-in resizer ([`crate::controller::resizer`]) reads a PVC's
//! requested and current sizes and writes the new capacity back. It writes
//! binary suffixes (`128Mi`), as the kubernetes-csi resizer does, so that
//! `kubectl get pvc` shows what the user asked for.

/// Why a quantity could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    #[error(
        "{0:?} is not a Kubernetes quantity (a number and an optional suffix such as Mi or G)"
    )]
    Malformed(String),
    #[error("{0:?} is negative")]
    Negative(String),
    #[error("{0:?} is more bytes than strata can address")]
    TooLarge(String),
}

/// The bytes a quantity stands for, rounded up to a whole byte.
pub fn bytes_of(text: &str) -> Result<u64, QuantityError> {
    let malformed = || QuantityError::Malformed(text.to_string());
    let s = text.trim();
    let (negative, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(malformed());
    }
    // value = digits / 10^fraction_len × base^exp (binary) or × 10^exp
    let digits: String = format!("{whole}{fraction}");
    let digits = digits.trim_start_matches('0');
    if digits.len() > 30 {
        return Err(QuantityError::TooLarge(text.to_string()));
    }
    let mantissa: u128 = if digits.is_empty() {
        0
    } else {
        digits.parse().map_err(|_| malformed())?
    };
    let mut scale_down = fraction.len() as i32;
    let mut multiplier: u128 = 1;
    match suffix {
        "" => {}
        "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => {
            let power = "KMGTPE".find(&suffix[..1]).expect("listed") as u32 + 1;
            multiplier = 1u128 << (10 * power);
        }
        "n" => scale_down += 9,
        "u" => scale_down += 6,
        "m" => scale_down += 3,
        "k" => scale_down -= 3,
        "M" => scale_down -= 6,
        "G" => scale_down -= 9,
        "T" => scale_down -= 12,
        "P" => scale_down -= 15,
        "E" => scale_down -= 18,
        _ => {
            let exponent = suffix
                .strip_prefix('e')
                .or_else(|| suffix.strip_prefix('E'))
                .ok_or_else(malformed)?;
            let exponent: i32 = exponent.parse().map_err(|_| malformed())?;
            if !(-40..=40).contains(&exponent) {
                return Err(QuantityError::TooLarge(text.to_string()));
            }
            scale_down -= exponent;
        }
    }
    if negative && mantissa != 0 {
        return Err(QuantityError::Negative(text.to_string()));
    }
    let too_large = || QuantityError::TooLarge(text.to_string());
    let mut value = mantissa.checked_mul(multiplier).ok_or_else(too_large)?;
    if scale_down < 0 {
        let factor = 10u128
            .checked_pow((-scale_down) as u32)
            .ok_or_else(too_large)?;
        value = value.checked_mul(factor).ok_or_else(too_large)?;
    } else if scale_down > 0 {
        match 10u128.checked_pow(scale_down as u32) {
            Some(divisor) => value = value.div_ceil(divisor),
            // Smaller than 10^-38 of the mantissa: under one byte.
            None => value = u128::from(value != 0),
        }
    }
    u64::try_from(value).map_err(|_| too_large())
}

/// `bytes` as a quantity: the largest binary suffix that divides it
/// exactly (`134217728` → `128Mi`), else plain bytes.
pub fn of_bytes(bytes: u64) -> String {
    const SUFFIXES: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    if bytes == 0 {
        return "0".into();
    }
    let mut best = None;
    for (i, suffix) in SUFFIXES.iter().enumerate() {
        let unit = 1u64 << (10 * (i as u32 + 1));
        if bytes.is_multiple_of(unit) {
            best = Some((bytes / unit, *suffix));
        }
    }
    match best {
        Some((n, suffix)) => format!("{n}{suffix}"),
        None => bytes.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn quantities_users_write() {
        assert_eq!(bytes_of("128Mi"), Ok(128 << 20));
        assert_eq!(bytes_of("1Gi"), Ok(1 << 30));
        assert_eq!(bytes_of("1.5Gi"), Ok(3 << 29));
        assert_eq!(bytes_of("1G"), Ok(1_000_000_000));
        assert_eq!(bytes_of("500M"), Ok(500_000_000));
        assert_eq!(bytes_of("5e9"), Ok(5_000_000_000));
        assert_eq!(bytes_of("1E3"), Ok(1000));
        assert_eq!(bytes_of("134217728"), Ok(134_217_728));
        assert_eq!(bytes_of("0"), Ok(0));
        assert_eq!(bytes_of("+2Ki"), Ok(2048));
        // Fractions of a byte round up.
        assert_eq!(bytes_of("1500m"), Ok(2));
        assert_eq!(bytes_of("0.1"), Ok(1));
        assert_eq!(bytes_of("1.0000001k"), Ok(1001));
    }

    #[test]
    fn malformed_quantities_are_refused() {
        for bad in ["", "Mi", "1.2.3", "12MiB", "1 Gi", "x", "1e", "1ex", "."] {
            assert!(
                matches!(bytes_of(bad), Err(QuantityError::Malformed(_))),
                "{bad:?}: {:?}",
                bytes_of(bad)
            );
        }
        assert!(matches!(bytes_of("-1Gi"), Err(QuantityError::Negative(_))));
        assert!(matches!(bytes_of("16Ei"), Err(QuantityError::TooLarge(_))));
        assert!(matches!(bytes_of("1e400"), Err(QuantityError::TooLarge(_))));
        assert!(matches!(
            bytes_of("9999999999999999999999999999999999"),
            Err(QuantityError::TooLarge(_))
        ));
    }

    #[test]
    fn bytes_become_binary_suffixes() {
        assert_eq!(of_bytes(128 << 20), "128Mi");
        assert_eq!(of_bytes(3 << 29), "1536Mi");
        assert_eq!(of_bytes(1 << 30), "1Gi");
        assert_eq!(of_bytes(1000), "1000");
        assert_eq!(of_bytes(4096), "4Ki");
        assert_eq!(of_bytes(0), "0");
    }

    proptest! {
        #[test]
        fn written_quantities_read_back(bytes in any::<u64>()) {
            prop_assert_eq!(bytes_of(&of_bytes(bytes)), Ok(bytes));
        }

        #[test]
        fn any_text_is_a_result_never_a_panic(s in "\\PC{0,24}") {
            let _ = bytes_of(&s);
        }

        #[test]
        fn decimal_suffixes_scale(n in 0u64..1_000_000, i in 0usize..5) {
            let suffix = ["", "k", "M", "G", "T"][i];
            prop_assert_eq!(
                bytes_of(&format!("{n}{suffix}")),
                Ok(n * 1000u64.pow(i as u32))
            );
        }
    }
}
