//! Human units on the command line: memory sizes and CPU counts.

/// `64Mi`, `512M`, `1Gi`, `1G`, `1048576`: bytes.
pub fn parse_memory(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("{text:?} is not a size like 64Mi or 1G"))?;
    let factor: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "ki" | "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mi" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (use Ki, Mi, Gi, K, M or G)")),
    };
    let bytes = value * factor;
    if !bytes.is_finite() || bytes < 0.0 || bytes > i64::MAX as f64 {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(bytes as i64)
}

/// `0.5`, `2`, `250m`: thousandths of a core.
pub fn parse_cpus(text: &str) -> Result<i64, String> {
    let text = text.trim();
    if let Some(millis) = text.strip_suffix('m') {
        return millis.parse::<i64>().map_err(|_| format!("{text:?} is not a CPU amount like 0.5 or 500m"));
    }
    let cores: f64 = text.parse().map_err(|_| format!("{text:?} is not a CPU amount like 0.5 or 500m"))?;
    if !cores.is_finite() || cores < 0.0 {
        return Err(format!("{text:?} is out of range"));
    }
    Ok((cores * 1000.0).round() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory() {
        assert_eq!(parse_memory("64Mi"), Ok(64 * 1024 * 1024));
        assert_eq!(parse_memory("1G"), Ok(1_000_000_000));
        assert_eq!(parse_memory("1048576"), Ok(1_048_576));
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("5 parsecs").is_err());
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("0.5"), Ok(500));
        assert_eq!(parse_cpus("2"), Ok(2000));
        assert_eq!(parse_cpus("250m"), Ok(250));
        assert!(parse_cpus("-1").is_err());
    }
}
