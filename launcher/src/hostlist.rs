//! SLURM's compressed hostlist syntax: `gpu[01-04,07]`, `a,b`, `rack[1-2]-n[1-3]`.
//!
//! Commas at the top level separate entries; inside brackets they separate ranges. A range keeps
//! the zero padding of its first number (`[08-10]` gives 08, 09, 10). Several bracket groups in
//! one entry give their cartesian product, leftmost slowest, as `scontrol show hostnames` does.

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("bad hostlist `{list}`: {reason}")]
pub struct HostlistError {
    pub list: String,
    pub reason: String,
}

/// Expands a hostlist into host names, in order.
pub fn expand(list: &str) -> Result<Vec<String>, HostlistError> {
    let err = |reason: String| HostlistError {
        list: list.to_string(),
        reason,
    };
    let mut hosts = Vec::new();
    for entry in split_top_level(list).map_err(err)? {
        let entry = entry.trim();
        if entry.is_empty() {
            continue;
        }
        hosts.extend(expand_entry(entry).map_err(err)?);
    }
    if hosts.is_empty() {
        return Err(err("no hosts".into()));
    }
    Ok(hosts)
}

fn split_top_level(list: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("unmatched `]` at byte {i}"));
                }
            }
            ',' if depth == 0 => {
                out.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if depth > 1 {
            return Err(format!("nested `[` at byte {i}"));
        }
    }
    if depth != 0 {
        return Err("unmatched `[`".into());
    }
    out.push(&list[start..]);
    Ok(out)
}

/// One entry: a prefix, then optionally a bracket group and the rest (expanded recursively).
fn expand_entry(entry: &str) -> Result<Vec<String>, String> {
    let Some(open) = entry.find('[') else {
        return Ok(vec![entry.to_string()]);
    };
    let close = entry[open..]
        .find(']')
        .map(|c| open + c)
        .ok_or_else(|| "unmatched `[`".to_string())?;
    let (prefix, body, rest) = (&entry[..open], &entry[open + 1..close], &entry[close + 1..]);
    let tails = expand_entry(rest)?;
    let mut out = Vec::new();
    for item in body.split(',') {
        for n in expand_range(item.trim())? {
            for t in &tails {
                out.push(format!("{prefix}{n}{t}"));
            }
        }
    }
    Ok(out)
}

fn expand_range(item: &str) -> Result<Vec<String>, String> {
    let parse = |s: &str| {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("`{s}` is not a number"));
        }
        s.parse::<u64>()
            .map_err(|e| format!("`{s}` is not a number: {e}"))
    };
    match item.split_once('-') {
        None => {
            parse(item)?;
            Ok(vec![item.to_string()])
        }
        Some((a, b)) => {
            let (lo, hi) = (parse(a)?, parse(b)?);
            if hi < lo {
                return Err(format!("range `{item}` runs backwards"));
            }
            if hi - lo > 100_000 {
                return Err(format!("range `{item}` is implausibly long"));
            }
            let width = a.len();
            Ok((lo..=hi).map(|n| format!("{n:0width$}")).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(s: &str) -> Vec<String> {
        expand(s).unwrap()
    }

    #[test]
    fn plain_and_comma_lists() {
        assert_eq!(e("node1"), ["node1"]);
        assert_eq!(e("a,b,c"), ["a", "b", "c"]);
    }

    #[test]
    fn ranges_keep_padding() {
        assert_eq!(
            e("gpu[01-04,07]"),
            ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]
        );
        assert_eq!(e("n[8-10]"), ["n8", "n9", "n10"]);
        assert_eq!(e("n[08-10]"), ["n08", "n09", "n10"]);
    }

    #[test]
    fn several_groups_and_entries() {
        assert_eq!(
            e("r[1-2]-n[1-2],login"),
            ["r1-n1", "r1-n2", "r2-n1", "r2-n2", "login"]
        );
        assert_eq!(e("gpu[1,3]-ib"), ["gpu1-ib", "gpu3-ib"]);
    }

    #[test]
    fn malformed_lists_are_refused() {
        for bad in ["gpu[01-04", "gpu01]", "gpu[a-b]", "gpu[4-1]", "", "x[[1]]"] {
            let err = expand(bad).unwrap_err();
            assert_eq!(err.list, bad);
        }
    }
}
