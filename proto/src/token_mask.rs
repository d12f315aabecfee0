//! `TokenMask`: the tokens a structured-output sequence may draw next, as the last stage applies
//! it to a rank's vocabulary slice.
//!
//! The coordinator's grammar engine computes one mask per sequence per step over the whole
//! vocabulary; each last-stage rank gets only its slice (`slice`). On the wire a mask is the
//! cheaper of two encodings: run lengths (alternately allowed and banned, as packed varints),
//! which a grammar's usual masks (a few digits; every token but those holding a quote) make
//! small, or a plain bitmap of the slice (one bit per token), the bound whatever the mask.

use std::ops::Range;

use serde::{Deserialize, Serialize};

/// The allowed ids among `[first, first + len)`, as ascending, disjoint, non-touching ranges.
/// Ids outside `[first, first + len)` are not allowed either: a rank given its own slice bans
/// nothing it does not hold, and a mask cut wrongly bans rather than lets a token through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenMask {
    first: u32,
    len: u32,
    allowed: Vec<Range<u32>>,
}

/// How a mask travels (the smaller of the two for its content).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaskEncoding {
    /// Alternately allowed and banned run lengths from `first`, starting with allowed (possibly
    /// 0); ids past the runs' total are banned.
    Runs(Vec<u32>),
    /// Bit `i % 8` of byte `i / 8` is id `first + i`; missing bytes are banned tokens.
    Bitmap(Vec<u8>),
}

impl TokenMask {
    /// The mask of `bits` (bit `i % 32` of word `i / 32` allows id `i`, as llguidance's bit
    /// vectors hold it) over ids `0..vocab_size`.
    pub fn from_bit_words(bits: &[u32], vocab_size: usize) -> Self {
        let len = vocab_size.min(bits.len() * 32) as u32;
        let allowed = ranges_of_bits(len as usize, |i| bits[i / 32] >> (i % 32) & 1 == 1);
        Self {
            first: 0,
            len: vocab_size as u32,
            allowed,
        }
    }

    /// A mask of `[first, first + len)` allowing exactly `allowed` (clamped into it, merged).
    pub fn from_ranges(
        first: u32,
        len: u32,
        allowed: impl IntoIterator<Item = Range<u32>>,
    ) -> Self {
        let end = first.saturating_add(len);
        let mut merged: Vec<Range<u32>> = Vec::new();
        let mut ranges: Vec<Range<u32>> = allowed
            .into_iter()
            .map(|r| r.start.max(first)..r.end.min(end))
            .filter(|r| r.start < r.end)
            .collect();
        ranges.sort_by_key(|r| r.start);
        for r in ranges {
            match merged.last_mut() {
                Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
                _ => merged.push(r),
            }
        }
        Self {
            first,
            len,
            allowed: merged,
        }
    }

    /// The ids the mask speaks for.
    pub fn span(&self) -> Range<u32> {
        self.first..self.first.saturating_add(self.len)
    }

    pub fn allows(&self, id: u32) -> bool {
        let i = self.allowed.partition_point(|r| r.end <= id);
        self.allowed.get(i).is_some_and(|r| r.contains(&id))
    }

    /// How many ids are allowed.
    pub fn allowed_count(&self) -> usize {
        self.allowed.iter().map(|r| r.len()).sum()
    }

    /// The allowed ranges, ascending.
    pub fn allowed(&self) -> &[Range<u32>] {
        &self.allowed
    }

    /// The same mask with `ids` allowed too (a grammar that allows <eos> allows every stop id).
    pub fn with_allowed(&self, ids: &[u32]) -> Self {
        let extra = ids.iter().map(|&id| id..id.saturating_add(1));
        Self::from_ranges(
            self.first,
            self.len,
            self.allowed.iter().cloned().chain(extra),
        )
    }

    /// What a rank holding the vocabulary rows `rows` needs of the mask.
    pub fn slice(&self, rows: Range<u32>) -> Self {
        let first = rows.start;
        let len = rows.end.saturating_sub(rows.start);
        Self::from_ranges(first, len, self.allowed.iter().cloned())
    }

    /// The banned ids among `rows` (global ids), as ranges: every id of `rows` the mask does not
    /// allow, those outside its span included.
    pub fn banned_within(&self, rows: Range<usize>) -> Vec<Range<usize>> {
        let mut banned = Vec::new();
        let mut at = rows.start;
        for r in &self.allowed {
            let (start, end) = (r.start as usize, r.end as usize);
            if end <= at {
                continue;
            }
            if start >= rows.end {
                break;
            }
            if start > at {
                banned.push(at..start);
            }
            at = end;
        }
        if at < rows.end {
            banned.push(at..rows.end);
        }
        banned
    }

    /// The cheaper wire form: run lengths unless a bitmap of the span is smaller.
    pub fn encode(&self) -> (u32, u32, MaskEncoding) {
        let runs = self.runs();
        let runs_bytes: usize = runs.iter().map(|&n| varint_len(n)).sum();
        let bitmap_bytes = (self.len as usize).div_ceil(8);
        let encoding = if runs_bytes <= bitmap_bytes {
            MaskEncoding::Runs(runs)
        } else {
            MaskEncoding::Bitmap(self.bitmap())
        };
        (self.first, self.len, encoding)
    }

    /// The mask a wire form describes. Never fails: runs past the span are cut at its end, and
    /// missing runs or bytes ban the rest, so a malformed mask can only ban tokens.
    pub fn decode(first: u32, len: u32, encoding: &MaskEncoding) -> Self {
        match encoding {
            MaskEncoding::Runs(runs) => {
                let mut at = first as u64;
                let mut allowed = Vec::new();
                for (i, &n) in runs.iter().enumerate() {
                    let end = at + n as u64;
                    if i % 2 == 0 && n > 0 {
                        allowed.push(clamp_u32(at)..clamp_u32(end));
                    }
                    at = end;
                }
                Self::from_ranges(first, len, allowed)
            }
            MaskEncoding::Bitmap(bytes) => {
                let n = (len as usize).min(bytes.len() * 8);
                let local = ranges_of_bits(n, |i| bytes[i / 8] >> (i % 8) & 1 == 1);
                let shifted = local
                    .into_iter()
                    .map(|r| first.saturating_add(r.start)..first.saturating_add(r.end));
                Self::from_ranges(first, len, shifted)
            }
        }
    }

    /// The size of the wire form's payload in bytes (varints or bitmap), for the notes and the
    /// bench.
    pub fn encoded_bytes(&self) -> usize {
        match self.encode().2 {
            MaskEncoding::Runs(runs) => runs.iter().map(|&n| varint_len(n)).sum(),
            MaskEncoding::Bitmap(b) => b.len(),
        }
    }

    fn runs(&self) -> Vec<u32> {
        let mut runs = Vec::with_capacity(self.allowed.len() * 2 + 1);
        let mut at = self.first;
        for r in &self.allowed {
            if runs.is_empty() && r.start > at {
                runs.push(0);
            }
            if r.start > at {
                runs.push(r.start - at);
            }
            runs.push(r.end - r.start);
            at = r.end;
        }
        runs
    }

    fn bitmap(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; (self.len as usize).div_ceil(8)];
        for r in &self.allowed {
            for id in r.clone() {
                let i = (id - self.first) as usize;
                bytes[i / 8] |= 1 << (i % 8);
            }
        }
        bytes
    }
}

fn clamp_u32(v: u64) -> u32 {
    v.min(u32::MAX as u64) as u32
}

/// The set bits of `0..n` as ranges.
fn ranges_of_bits(n: usize, bit: impl Fn(usize) -> bool) -> Vec<Range<u32>> {
    let mut ranges = Vec::new();
    let mut start = None;
    for i in 0..n {
        match (bit(i), start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                ranges.push(s as u32..i as u32);
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        ranges.push(s as u32..n as u32);
    }
    ranges
}

fn varint_len(n: u32) -> usize {
    match n {
        0..=0x7f => 1,
        0x80..=0x3fff => 2,
        0x4000..=0x1f_ffff => 3,
        0x20_0000..=0xfff_ffff => 4,
        _ => 5,
    }
}

#[cfg(test)]
// A list of one allowed range is what a mask often is.
#[allow(clippy::single_range_in_vec_init)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn words_of(ids: &[u32], vocab: usize) -> Vec<u32> {
        let mut w = vec![0u32; vocab.div_ceil(32)];
        for &id in ids {
            w[id as usize / 32] |= 1 << (id % 32);
        }
        w
    }

    #[test]
    fn a_grammar_mask_is_its_allowed_ranges() {
        let m = TokenMask::from_bit_words(&words_of(&[3, 4, 5, 9, 63], 64), 64);
        assert_eq!(m.allowed(), &[3..6, 9..10, 63..64]);
        assert!(m.allows(4) && !m.allows(6) && m.allows(63) && !m.allows(64));
        assert_eq!(m.allowed_count(), 5);
        assert_eq!(m.banned_within(0..64), vec![0..3, 6..9, 10..63]);
        assert_eq!(m.banned_within(4..12), vec![6..9, 10..12]);
        // A rank of ids 8..40 gets what lies inside; beyond its span every id is banned.
        let s = m.slice(8..40);
        assert_eq!((s.span(), s.allowed()), (8..40, &[9..10][..]));
        assert_eq!(s.banned_within(0..64), vec![0..9, 10..64]);
        assert_eq!(
            m.with_allowed(&[6, 1]).allowed(),
            &[1..2, 3..7, 9..10, 63..64]
        );
    }

    #[test]
    fn few_runs_travel_as_runs_and_scattered_bits_as_a_bitmap() {
        let digits = TokenMask::from_ranges(0, 262_144, [1000..1010]);
        let (_, _, e) = digits.encode();
        assert_eq!(e, MaskEncoding::Runs(vec![0, 1000, 10]));
        assert_eq!(digits.encoded_bytes(), 4);
        let every_other: Vec<Range<u32>> = (0..4096).map(|i| 2 * i..2 * i + 1).collect();
        let scattered = TokenMask::from_ranges(0, 8192, every_other);
        assert!(matches!(scattered.encode().2, MaskEncoding::Bitmap(_)));
        assert_eq!(scattered.encoded_bytes(), 1024);
    }

    #[test]
    fn malformed_wire_masks_only_ban() {
        // Runs past the span are cut; a short bitmap bans what it does not cover.
        let m = TokenMask::decode(10, 5, &MaskEncoding::Runs(vec![2, 1, u32::MAX]));
        assert_eq!(m.allowed(), &[10..12, 13..15]);
        let m = TokenMask::decode(0, 100, &MaskEncoding::Bitmap(vec![0xff]));
        assert_eq!(m.allowed(), &[0..8]);
        let m = TokenMask::decode(u32::MAX - 1, 10, &MaskEncoding::Runs(vec![10]));
        assert_eq!(m.allowed(), &[u32::MAX - 1..u32::MAX]);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        #[test]
        fn encoding_round_trips_and_slices_agree(
            ids in proptest::collection::btree_set(0u32..2000, 0..400),
            cut in 0u32..2000,
        ) {
            let ids: Vec<u32> = ids.into_iter().collect();
            let m = TokenMask::from_bit_words(&words_of(&ids, 2000), 2000);
            for id in 0..2000 {
                prop_assert_eq!(m.allows(id), ids.contains(&id));
            }
            let (first, len, e) = m.encode();
            prop_assert_eq!(&TokenMask::decode(first, len, &e), &m);
            for rows in [0..cut, cut..2000] {
                let s = m.slice(rows.clone());
                let (first, len, e) = s.encode();
                let back = TokenMask::decode(first, len, &e);
                prop_assert_eq!(&back, &s);
                let r = rows.start as usize..rows.end as usize;
                prop_assert_eq!(back.banned_within(r.clone()), m.banned_within(r));
            }
        }
    }
}
