//! Every inclusion and consistency proof of every tree size up to 512 verifies, and no damaged
//! proof does (nor does any panic).

use sandbox_audit::merkle::{Hash, MerkleTree, leaf_hash, verify_consistency, verify_inclusion};

const MAX: u64 = 512;

fn tree() -> (MerkleTree, Vec<Hash>, Vec<Hash>) {
    let mut tree = MerkleTree::new();
    let mut leaves = Vec::new();
    let mut roots = vec![tree.root(0).expect("empty root")];
    for i in 0..MAX {
        let leaf = leaf_hash(format!("record {i}").as_bytes());
        leaves.push(leaf);
        tree.push(leaf);
        roots.push(tree.root(i + 1).expect("root"));
    }
    (tree, leaves, roots)
}

/// Damaged versions of a proof: each hash flipped, the last dropped, one appended, the first
/// two swapped.
fn damaged(proof: &[Hash]) -> Vec<Vec<Hash>> {
    let mut out = Vec::new();
    for i in 0..proof.len() {
        let mut flipped = proof.to_vec();
        flipped[i][i % 32] ^= 0x01;
        out.push(flipped);
    }
    if !proof.is_empty() {
        out.push(proof[..proof.len() - 1].to_vec());
    }
    let mut extended = proof.to_vec();
    extended.push([0xab; 32]);
    out.push(extended);
    if proof.len() >= 2 && proof[0] != proof[1] {
        let mut swapped = proof.to_vec();
        swapped.swap(0, 1);
        out.push(swapped);
    }
    out
}

#[test]
fn every_inclusion_proof_up_to_512_verifies_and_damaged_ones_do_not() {
    let (tree, leaves, roots) = tree();
    let mut checked = 0u64;
    for size in 1..=MAX {
        let root = &roots[size as usize];
        for index in 0..size {
            let leaf = &leaves[index as usize];
            let proof = tree.inclusion_proof(index, size).expect("proof");
            assert!(
                verify_inclusion(leaf, index, size, &proof, root),
                "inclusion {index}/{size}"
            );
            checked += 1;
            // Damage is checked on a sample of sizes; the full set multiplies the run time by
            // the proof length for no new shape.
            if size % 31 == 0 || size <= 40 {
                for bad in damaged(&proof) {
                    assert!(!verify_inclusion(leaf, index, size, &bad, root));
                }
                if index + 1 < size {
                    assert!(!verify_inclusion(leaf, index + 1, size, &proof, root));
                }
                assert!(!verify_inclusion(&[0; 32], index, size, &proof, root));
            }
        }
    }
    assert_eq!(checked, MAX * (MAX + 1) / 2);
}

#[test]
fn every_consistency_proof_up_to_512_verifies_and_damaged_ones_do_not() {
    let (tree, _, roots) = tree();
    for second in 0..=MAX {
        for first in 0..=second {
            let proof = tree.consistency_proof(first, second).expect("proof");
            let (r1, r2) = (&roots[first as usize], &roots[second as usize]);
            assert!(
                verify_consistency(first, second, r1, r2, &proof),
                "consistency {first}->{second}"
            );
            if first > 0 && first < second && (second % 29 == 0 || second <= 40) {
                for bad in damaged(&proof) {
                    assert!(!verify_consistency(first, second, r1, r2, &bad));
                }
                // Another tree's roots, or the sizes moved, fail too.
                if second < MAX {
                    let other = &roots[second as usize + 1];
                    assert!(!verify_consistency(first, second, r1, other, &proof));
                }
                assert!(!verify_consistency(first, second, r2, r1, &proof));
            }
        }
    }
}

#[test]
fn proofs_of_arbitrary_bytes_never_panic() {
    let (_, leaves, roots) = tree();
    // Deterministic junk: hashes of counters, odd lengths, huge sizes and indices.
    let junk: Vec<Hash> = (0..40u32).map(|i| leaf_hash(&i.to_be_bytes())).collect();
    for len in 0..junk.len() {
        let proof = &junk[..len];
        for (index, size) in [(0, 1), (3, 7), (u64::MAX - 1, u64::MAX), (5, 3), (0, 0)] {
            let _ = verify_inclusion(&leaves[0], index, size, proof, &roots[8]);
        }
        for (first, second) in [(1, 2), (7, 512), (u64::MAX - 1, u64::MAX), (9, 3), (0, 0)] {
            let _ = verify_consistency(first, second, &roots[1], &roots[8], proof);
        }
    }
}
