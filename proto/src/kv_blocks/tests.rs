use std::collections::HashMap;

use super::*;
use crate::rng::SplitMix64;

const BS: usize = 4;

fn cached(num_blocks: usize) -> KvBlockManager {
    KvBlockManager::new(num_blocks, BS).with_prefix_caching(true)
}

/// `n` tokens starting at `from`: distinct runs for distinct `from`.
fn tokens(from: u32, n: usize) -> Vec<u32> {
    (from..from + n as u32).collect()
}

/// Allocates for `context` (room for one more token), computes all of it and commits it, as
/// the engine does once the prefill's last step returned.
fn prefilled(m: &KvBlockManager, context: &[u32]) -> KvAllocation {
    let mut a = m.allocate_for(context, context.len() + 1).expect("fits");
    a.commit(context);
    a
}

/// The pool's refcounts must equal how often each block appears in the live allocations.
fn check(m: &KvBlockManager, live: &[&KvAllocation]) {
    let mut refs = HashMap::new();
    for a in live {
        for &b in a.block_table() {
            *refs.entry(b).or_insert(0) += 1;
        }
    }
    m.lock().check(&refs);
}

#[test]
fn blocks_return_on_drop_and_growth_is_all_or_nothing() {
    let m = KvBlockManager::new(4, 16);
    let mut a = m.allocate(17).expect("2 blocks fit");
    assert_eq!(a.block_table(), &[0, 1]);
    assert_eq!(m.used_blocks(), 2);
    let err = a
        .ensure_capacity(16 * 5)
        .expect_err("5 blocks do not fit in 4");
    assert_eq!(
        err,
        KvError::OutOfBlocks {
            needed: 3,
            free: 2,
            total: 4,
            block_size: 16
        }
    );
    assert_eq!(m.used_blocks(), 2, "a failed growth takes nothing");
    a.ensure_capacity(64).expect("4 blocks fit");
    assert_eq!(a.block_table(), &[0, 1, 2, 3]);
    drop(a);
    assert_eq!(m.used_blocks(), 0);
}

#[test]
fn a_cached_prefix_is_shared_read_only_and_counted_once() {
    let m = cached(16);
    // 10 tokens: blocks [0,4) [4,8) full, [8,10) partial.
    let prompt = tokens(100, 10);
    let a = prefilled(&m, &prompt);
    assert_eq!(a.reused_tokens(), 0);
    assert_eq!(a.sealed_blocks(), 2, "the partial block is not sealed");
    let b = prefilled(&m, &prompt);
    assert_eq!(b.reused_tokens(), 8, "two full blocks reused");
    assert_eq!(b.block_table()[..2], a.block_table()[..2]);
    assert_ne!(
        b.block_table()[2],
        a.block_table()[2],
        "the partly filled block is never shared"
    );
    assert_eq!(m.used_blocks(), 4, "shared blocks count once");
    check(&m, &[&a, &b]);
    drop(a);
    assert_eq!(m.used_blocks(), 3, "b still reads the shared blocks");
    assert_eq!(m.cached_blocks(), 0);
    check(&m, &[&b]);
    drop(b);
    assert_eq!(m.used_blocks(), 0);
    assert_eq!(m.cached_blocks(), 2, "kept after the sequences end");
    check(&m, &[]);
}

#[test]
fn the_block_with_the_last_token_is_always_computed() {
    let m = cached(16);
    let prompt = tokens(0, 8); // exactly two full blocks
    let a = prefilled(&m, &prompt);
    assert_eq!(a.sealed_blocks(), 2);
    let b = m.allocate_for(&prompt, 9).expect("fits");
    assert_eq!(
        b.reused_tokens(),
        4,
        "the second block holds the last prompt token: recomputed for its logits"
    );
    assert_eq!(m.reusable_blocks(&prompt), 1);
    assert_eq!(m.reusable_blocks(&[]), 0);
    check(&m, &[&a, &b]);
}

#[test]
fn matching_is_exact_and_chained_over_the_whole_prefix() {
    let m = cached(32);
    let a = prefilled(&m, &tokens(0, 13)); // blocks 0..4 | 4..8 | 8..12 | 12
    drop(a);
    // Same first block, different second: one block reused.
    let mut other = tokens(0, 13);
    other[5] = 999;
    assert_eq!(m.cached_prefix_blocks(&other), 1);
    // The same third block after a different second block is not a hit: identity is the
    // whole prefix, not the block's own tokens.
    let mut third_only = tokens(0, 13);
    third_only[0] = 999;
    assert_eq!(m.cached_prefix_blocks(&third_only), 0);
    // The exact prompt hits all three full blocks; a longer one too.
    assert_eq!(m.cached_prefix_blocks(&tokens(0, 13)), 3);
    assert_eq!(m.cached_prefix_blocks(&tokens(0, 40)), 3);
    // Caching off: nothing is found, nothing registered.
    let off = KvBlockManager::new(8, BS);
    drop(prefilled(&off, &tokens(0, 13)));
    assert_eq!(off.cached_prefix_blocks(&tokens(0, 13)), 0);
    assert_eq!(off.cached_blocks(), 0);
}

#[test]
fn free_blocks_go_first_then_the_least_recently_used() {
    let m = cached(6);
    let a = prefilled(&m, &tokens(0, 5)); // 2 blocks: [0..4) cached, 1 partial
    let b = prefilled(&m, &tokens(100, 5));
    let (a0, b0) = (a.block_table()[0], b.block_table()[0]);
    drop(a); // a's cached block idles first: least recently used
    drop(b);
    assert_eq!(m.cached_blocks(), 2);
    assert_eq!(m.used_blocks(), 0);
    // 4 free blocks are taken before any cached one.
    let c = m.allocate(16).expect("4 blocks");
    assert!(!c.block_table().contains(&a0) && !c.block_table().contains(&b0));
    assert_eq!(m.cached_blocks(), 2);
    // The next one evicts a's block, the oldest.
    let d = m.allocate(4).expect("1 block");
    assert_eq!(d.block_table(), &[a0]);
    assert_eq!(
        m.cached_prefix_blocks(&tokens(0, 5)),
        0,
        "a's prefix evicted"
    );
    assert_eq!(m.cached_prefix_blocks(&tokens(100, 5)), 1, "b's kept");
    // Reusing b's block makes it the most recently used: it is referenced now, not idle.
    let e = m
        .allocate_for(&tokens(100, 5), 6)
        .expect_err("1 hit + 1 new > 0 left");
    assert_eq!(
        e,
        KvError::OutOfBlocks {
            needed: 1,
            free: 0,
            total: 6,
            block_size: BS
        },
        "the idle hit is not counted as available for the rest"
    );
    assert_eq!(m.cached_blocks(), 1, "a refused allocation takes nothing");
    check(&m, &[&c, &d]);
}

#[test]
fn a_sequence_releases_its_tail_before_its_head() {
    let m = cached(4);
    let a = prefilled(&m, &tokens(0, 13)); // 3 full blocks cached + 1
    let table = a.block_table().to_vec();
    drop(a);
    // The first block taken from the LRU is the third (the tail), so the prefix others share
    // survives longest.
    let b = m.allocate(5).expect("the free block, then one evicted");
    assert_eq!(b.block_table(), &[table[3], table[2]]);
    assert_eq!(m.cached_prefix_blocks(&tokens(0, 13)), 2);
}

/// A child key names its parent's content id, never its block number. A parent is normally
/// evicted only after its children (they idle first), but a duplicate's children can outlive
/// it: `b` computed the same first block as `a` privately and registered its second block under
/// `a`'s content. Once `a`'s block is evicted and its number refilled with the same tokens, the
/// new content has a new id, so `b`'s orphaned child cannot match.
#[test]
fn a_reused_block_number_never_lets_a_stale_child_match() {
    let m = cached(8);
    let short = tokens(0, 5);
    let long = tokens(0, 9);
    let mut a = m.allocate_for(&short, 6).expect("2 blocks");
    let mut b = m.allocate_for(&long, 10).expect("3 blocks");
    a.commit(&short);
    b.commit(&long);
    assert_eq!(
        m.cached_prefix_blocks(&long),
        2,
        "a's first block, b's second"
    );
    let p = a.block_table()[0];
    drop(a);
    // 4 free blocks, then a's cached first block: evicted.
    let all = m.allocate(5 * BS).expect("every unreferenced block");
    assert!(all.block_table().contains(&p));
    assert_eq!(m.cached_prefix_blocks(&long), 0);
    drop(all);
    let d = prefilled(&m, &short);
    assert_eq!(d.reused_tokens(), 0);
    assert_eq!(
        m.cached_prefix_blocks(&short),
        1,
        "the first block is cached again"
    );
    assert_eq!(
        m.cached_prefix_blocks(&long),
        1,
        "b's block names the evicted content: unreachable"
    );
    check(&m, &[&b, &d]);
}

#[test]
fn duplicate_content_is_registered_once() {
    let m = cached(16);
    let prompt = tokens(0, 9);
    // Both allocated before either committed: no sharing possible, both compute.
    let mut a = m.allocate_for(&prompt, 10).expect("fits");
    let mut b = m.allocate_for(&prompt, 10).expect("fits");
    a.commit(&prompt);
    b.commit(&prompt);
    assert_eq!(b.sealed_blocks(), 2);
    // b's blocks stayed private; a later sequence with the same prompt then extending it
    // chains through the content ids b learned, which are a's.
    let mut longer = prompt.clone();
    longer.extend(tokens(50, 8));
    b.ensure_capacity(longer.len()).expect("grows");
    b.commit(&longer);
    let c = m.allocate_for(&longer, longer.len() + 1).expect("fits");
    assert_eq!(
        c.reused_tokens(),
        16,
        "a's two blocks, then b's third and fourth"
    );
    check(&m, &[&a, &b, &c]);
    drop((a, b, c));
    check(&m, &[]);
}

#[test]
fn clearing_the_cache_forgets_every_block() {
    let m = cached(8);
    let prompt = tokens(0, 9);
    drop(prefilled(&m, &prompt));
    let mut live = prefilled(&m, &prompt);
    assert_eq!(live.reused_tokens(), 8);
    let old = m.allocate_for(&tokens(100, 9), 10).expect("fits");
    m.clear_cache();
    assert_eq!(m.cached_prefix_blocks(&prompt), 0);
    assert_eq!(m.cached_blocks(), 0);
    // An allocation from before the clear registers nothing: its K/V may be gone.
    let mut old = old;
    old.commit(&tokens(100, 9));
    assert_eq!(m.cached_prefix_blocks(&tokens(100, 9)), 0);
    live.commit(&prompt);
    check(&m, &[&live, &old]);
    drop((live, old));
    assert_eq!(m.used_blocks(), 0);
    assert_eq!(
        m.cached_blocks(),
        0,
        "formerly cached blocks came back free"
    );
    check(&m, &[]);
    // After the clear, new sequences cache again.
    drop(prefilled(&m, &prompt));
    assert_eq!(m.cached_prefix_blocks(&prompt), 2);
}

/// Random allocations, shares, growths, commits, drops and clears against a small pool: after
/// every operation each block is in exactly one state and its refcount is the number of live
/// allocations holding it; at the end everything is back.
#[test]
fn random_operations_keep_the_counts_consistent() {
    for seed in 0..40 {
        let mut rng = SplitMix64::new(seed);
        let m = cached(12);
        // Prompts over a tiny alphabet, so prefixes collide often.
        let prompts: Vec<Vec<u32>> = (0..6)
            .map(|_| {
                let len = 1 + (rng.next_u64() % 18) as usize;
                (0..len).map(|_| (rng.next_u64() % 2) as u32).collect()
            })
            .collect();
        let mut live: Vec<(KvAllocation, Vec<u32>)> = Vec::new();
        // What each block's K/V stands for, as the workers would hold it: the whole prefix up
        // to the block's end, written by the sequence that computed it.
        let mut written: HashMap<u32, Vec<u32>> = HashMap::new();
        let commit = |a: &mut KvAllocation, p: &[u32], written: &mut HashMap<u32, Vec<u32>>| {
            let before = a.sealed_blocks();
            a.commit(p);
            for i in before..a.sealed_blocks() {
                written.insert(a.block_table()[i], p[..(i + 1) * BS].to_vec());
            }
        };
        for _ in 0..300 {
            match rng.next_u64() % 6 {
                0 | 1 => {
                    let p = prompts[(rng.next_u64() % 6) as usize].clone();
                    if let Ok(a) = m.allocate_for(&p, p.len() + 1) {
                        assert!(a.reused_tokens() < p.len());
                        for (i, b) in a.block_table()[..a.reused_tokens() / BS].iter().enumerate() {
                            assert_eq!(
                                written.get(b).map(Vec::as_slice),
                                Some(&p[..(i + 1) * BS]),
                                "seed {seed}: reused block {b} holds another prefix"
                            );
                        }
                        live.push((a, p));
                    }
                }
                2 if !live.is_empty() => {
                    let i = (rng.next_u64() % live.len() as u64) as usize;
                    let (a, p) = &mut live[i];
                    p.push((rng.next_u64() % 2) as u32);
                    if a.ensure_capacity(p.len() + 1).is_ok() {
                        commit(a, p, &mut written);
                    } else {
                        p.pop();
                    }
                }
                3 if !live.is_empty() => {
                    let i = (rng.next_u64() % live.len() as u64) as usize;
                    let (a, p) = &mut live[i];
                    commit(a, p, &mut written);
                }
                4 if !live.is_empty() => {
                    let i = (rng.next_u64() % live.len() as u64) as usize;
                    live.swap_remove(i);
                }
                5 if rng.next_u64().is_multiple_of(10) => m.clear_cache(),
                _ => {}
            }
            let holders: Vec<&KvAllocation> = live.iter().map(|(a, _)| a).collect();
            check(&m, &holders);
        }
        live.clear();
        check(&m, &[]);
        assert_eq!(m.used_blocks(), 0, "seed {seed}");
    }
}
