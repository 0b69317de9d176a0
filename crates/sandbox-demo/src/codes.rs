//! Unified social credit codes (GB 32100-2015) with valid check characters, and the organization
//! code inside them (GB 11714-1997).

/// The 31 characters a credit code may use; a character's value is its index.
const ALPHABET: &[u8; 31] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";
const WEIGHTS: [u32; 17] = [
    1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28,
];
const ORG_WEIGHTS: [u32; 8] = [3, 7, 9, 10, 5, 8, 4, 2];

/// The credit code of the `index`-th enterprise of a region: registration authority 9 (market
/// regulation), category 1 (enterprise), the 6-digit division code, a 9-character organization code
/// and the check character. Distinct indices below 10^8 give distinct codes.
pub fn credit_code(region_code: &str, index: u64) -> String {
    debug_assert_eq!(region_code.len(), 6);
    // Multiplying by a number coprime with 10^8 permutes 0..10^8, so codes look scattered yet
    // never collide.
    let body = (index.wrapping_mul(7_919_131) + 1_234_567) % 100_000_000;
    let org_body = format!("{body:08}");
    let org_sum: u32 = org_body
        .bytes()
        .zip(ORG_WEIGHTS)
        .map(|(b, w)| u32::from(b - b'0') * w)
        .sum();
    let org_check = match 11 - org_sum % 11 {
        10 => 'X',
        11 => '0',
        d => char::from_digit(d, 10).expect("a digit below 10"),
    };
    let mut code = format!("91{region_code}{org_body}{org_check}");
    code.push(check_character(&code).expect("built from the alphabet"));
    code
}

/// The check character for the first 17 characters, or `None` if one is outside the alphabet.
fn check_character(first17: &str) -> Option<char> {
    let mut sum = 0u32;
    for (byte, weight) in first17.bytes().zip(WEIGHTS) {
        let value = ALPHABET.iter().position(|&a| a == byte)? as u32;
        sum += value * weight;
    }
    let check = (31 - sum % 31) % 31;
    Some(char::from(ALPHABET[check as usize]))
}

/// Whether a string is an 18-character credit code whose check character is right.
pub fn is_valid_credit_code(code: &str) -> bool {
    code.len() == 18
        && code.is_ascii()
        && check_character(&code[..17]).is_some_and(|c| code.ends_with(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_valid_code_passes() {
        // A published example code of an enterprise (Tencent Technology (Shenzhen)).
        assert!(is_valid_credit_code("9144030071526726XG"));
        assert!(!is_valid_credit_code("9144030071526726XH"));
    }

    #[test]
    fn generated_codes_are_valid_and_distinct() {
        let codes: std::collections::BTreeSet<String> =
            (0..5000).map(|i| credit_code("450102", i)).collect();
        assert_eq!(codes.len(), 5000);
        assert!(codes.iter().all(|c| is_valid_credit_code(c)));
    }
}
