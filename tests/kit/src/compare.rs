//! Comparing logit rows: the measures every parity test states its tolerances in.

/// The largest element-wise difference of two rows of the same length.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "logit rows differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Largest minus smallest logit: the scale relative tolerances are taken against.
pub fn logit_range(v: &[f32]) -> f32 {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let min = v.iter().copied().fold(f32::INFINITY, f32::min);
    max - min
}

/// The best logit's lead over the second: a greedy choice closer than a tolerance to a tie is
/// not evidence either way.
pub fn top2_margin(row: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in row {
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    a - b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures() {
        assert_eq!(max_abs_diff(&[1.0, -2.0], &[1.5, 1.0]), 3.0);
        assert_eq!(logit_range(&[3.0, -1.0, 2.0]), 4.0);
        assert_eq!(top2_margin(&[1.0, 4.0, 2.5, 4.0]), 0.0);
        assert_eq!(top2_margin(&[1.0, 4.0, 2.5]), 1.5);
    }
}
