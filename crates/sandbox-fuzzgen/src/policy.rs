//! Policy files from fuzz bytes: the demo policies with lines replaced, dropped, duplicated or
//! given odd values, so the loader sees files that are almost right (the ones that matter: a
//! typo, a wrong level, reversed bounds, a grant naming nothing) as well as garbage.

use arbitrary::{Result, Unstructured};

/// Values that mean something to the loader somewhere.
const VALUES: [&str; 24] = [
    "\"L1\"",
    "\"L4\"",
    "\"L9\"",
    "\"identifier\"",
    "\"measure\"",
    "\"masked\"",
    "\"hidden\"",
    "\"dimension\"",
    "\"join_key\"",
    "\"analyst\"",
    "\"consumer\"",
    "\"\"",
    "0",
    "-1",
    "1e308",
    "nan",
    "[0, 1000000]",
    "[5, 1]",
    "[]",
    "true",
    "\"count\"",
    "[\"count\", \"median\"]",
    "{ epsilon = 0.0 }",
    "\"partial:3:-1\"",
];

/// The policy sources (name, text) for one input: mutated demo policies.
pub fn sources(
    u: &mut Unstructured<'_>,
    demo: &[(String, String)],
) -> Result<Vec<(String, String)>> {
    let mut files: Vec<(String, String)> = demo.to_vec();
    if files.is_empty() {
        return Ok(files);
    }
    for _ in 0..u.int_in_range(1..=6)? {
        let index = u.choose_index(files.len())?;
        let mut lines: Vec<String> = files[index].1.lines().map(str::to_string).collect();
        if lines.is_empty() {
            continue;
        }
        let at = u.choose_index(lines.len())?;
        match u.int_in_range(0..=5)? {
            // Replace a value.
            0 | 1 => {
                if let Some((key, _)) = lines[at].split_once('=') {
                    lines[at] = format!("{key}= {}", u.choose(&VALUES)?);
                }
            }
            2 => {
                lines.remove(at);
            }
            3 => {
                let copy = lines[at].clone();
                lines.insert(at, copy);
            }
            // An unknown or misplaced key.
            4 => lines.insert(
                at,
                format!(
                    "{} = {}",
                    u.choose(&["levle", "role", "min_units", "bounds", "mask", "datasets"])?,
                    u.choose(&VALUES)?
                ),
            ),
            // Raw bytes as text.
            _ => {
                let len = u.int_in_range(0..=40usize)?.min(u.len());
                let bytes = u.bytes(len)?;
                lines[at] = String::from_utf8_lossy(bytes).into_owned();
            }
        }
        files[index].1 = lines.join("\n");
    }
    if u.ratio(1, 8)? {
        // A file dropped entirely: grants may now name datasets that do not exist.
        let index = u.choose_index(files.len())?;
        files.remove(index);
    }
    Ok(files)
}

/// The repository's policy files as sources.
pub fn demo_sources() -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    sandbox_policy::read_dir_sources(&dir).expect("the repository's policies read")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mutations reach both outcomes: most mutated sets are refused with a message, some still
    /// load; the unmutated set loads.
    #[test]
    fn mutated_policies_load_or_are_refused() {
        let demo = demo_sources();
        sandbox_policy::load_sources(&demo).expect("the demo policies load");
        let (mut loaded, mut refused) = (0, 0);
        for seed in 0..400u32 {
            let bytes: Vec<u8> = (0..64u32)
                .map(|i| {
                    (seed
                        .wrapping_mul(2_654_435_761)
                        .wrapping_add(i.wrapping_mul(97))
                        >> 9) as u8
                })
                .collect();
            let files = sources(&mut Unstructured::new(&bytes), &demo).expect("sources");
            match sandbox_policy::load_sources(&files) {
                Ok(_) => loaded += 1,
                Err(error) => {
                    assert!(!error.to_string().is_empty());
                    refused += 1;
                }
            }
        }
        assert!(
            loaded > 10 && refused > 100,
            "loaded {loaded}, refused {refused}"
        );
    }
}
