//! The nearest valid name to a misspelled one, for refusals that say "did you mean": unknown
//! settings and unknown request fields are refused, never ignored, and a typo gets its fix.

/// The valid name closest to `name` by edit distance (case aside), if it is close enough to be a
/// misspelling: at most a third of the name's characters, and at least 2, apart.
pub fn nearest<'a>(name: &str, valid: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let name = name.to_ascii_lowercase();
    let (distance, best) = valid
        .into_iter()
        .map(|v| (edit_distance(&name, &v.to_ascii_lowercase()), v))
        .min_by_key(|(d, _)| *d)?;
    (distance <= (name.chars().count() / 3).max(2)).then_some(best)
}

/// Levenshtein distance: the fewest single-character insertions, deletions and substitutions
/// that turn `a` into `b`.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    // row[j]: distance between the prefix of `a` read so far and b[..j].
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_single_character_edits() {
        assert_eq!(edit_distance("max_runing", "max_running"), 1);
        assert_eq!(edit_distance("tp", "pp"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }

    #[test]
    fn a_misspelling_gets_the_nearest_and_a_stranger_nothing() {
        let valid = ["max_tokens", "max_completion_tokens", "temperature"];
        assert_eq!(nearest("max_token", valid), Some("max_tokens"));
        assert_eq!(nearest("Temprature", valid), Some("temperature"));
        assert_eq!(nearest("colour", valid), None);
    }
}
