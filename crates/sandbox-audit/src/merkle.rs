//! The journal's Merkle tree, as RFC 6962 / RFC 9162 define it: leaf `i` is the payload of
//! record `i + 1`, hashed `SHA-256(0x00 || payload)`; an interior node is
//! `SHA-256(0x01 || left || right)`; the tree of `n` leaves splits at the largest power of two
//! below `n`. Proofs are generated from stored perfect subtrees and verified with the algorithms
//! of RFC 9162 sections 2.1.3.2 and 2.1.4.2, which share no code with the generators.

use ring::digest;

/// A SHA-256 output.
pub type Hash = [u8; 32];

/// The root of the empty tree: SHA-256 of nothing.
pub fn empty_root() -> Hash {
    sha256(&[&[]])
}

/// The hash of a leaf holding `data`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    sha256(&[&[0x00], data])
}

/// The hash of an interior node.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    sha256(&[&[0x01], left, right])
}

fn sha256(parts: &[&[u8]]) -> Hash {
    let mut context = digest::Context::new(&digest::SHA256);
    for part in parts {
        context.update(part);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(context.finish().as_ref());
    out
}

/// The largest power of two strictly below `n` (`n >= 2`).
fn split(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1 << (63 - (n - 1).leading_zeros())
}

/// An append-only tree over leaf hashes. `levels[k][i]` is the root of the perfect subtree of
/// `2^k` leaves starting at leaf `i * 2^k`; only complete subtrees are kept, so the tree holds
/// about two hashes per leaf and any root or proof needs O(log² n) hashing.
#[derive(Debug, Clone, Default)]
pub struct MerkleTree {
    levels: Vec<Vec<Hash>>,
}

/// A request the tree cannot answer: an index or size beyond what it holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProofError(pub String);

impl MerkleTree {
    pub fn new() -> MerkleTree {
        MerkleTree::default()
    }

    /// Number of leaves.
    pub fn size(&self) -> u64 {
        self.levels.first().map_or(0, |l| l.len() as u64)
    }

    /// Appends a leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let mut node = leaf;
        let mut level = 0;
        loop {
            if self.levels.len() == level {
                self.levels.push(Vec::new());
            }
            self.levels[level].push(node);
            let len = self.levels[level].len();
            if !len.is_multiple_of(2) {
                break;
            }
            node = node_hash(&self.levels[level][len - 2], &self.levels[level][len - 1]);
            level += 1;
        }
    }

    /// The root of the tree of the first `size` leaves.
    pub fn root(&self, size: u64) -> Result<Hash, ProofError> {
        self.check_size(size)?;
        Ok(if size == 0 {
            empty_root()
        } else {
            self.subtree(0, size)
        })
    }

    /// The audit path of leaf `index` in the tree of the first `size` leaves (RFC 6962 PATH).
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>, ProofError> {
        self.check_size(size)?;
        if index >= size {
            return Err(ProofError(format!(
                "leaf {index} is not in a tree of {size} leaves"
            )));
        }
        let mut proof = Vec::new();
        self.path(index, 0, size, &mut proof);
        Ok(proof)
    }

    /// The proof that the tree of `first` leaves is a prefix of the tree of `second` leaves
    /// (RFC 6962 PROOF). Empty when `first` is 0 or equals `second`.
    pub fn consistency_proof(&self, first: u64, second: u64) -> Result<Vec<Hash>, ProofError> {
        self.check_size(second)?;
        if first > second {
            return Err(ProofError(format!(
                "a tree of {first} leaves is not a prefix of one of {second}"
            )));
        }
        let mut proof = Vec::new();
        if first > 0 && first < second {
            self.subproof(first, 0, second, true, &mut proof);
        }
        Ok(proof)
    }

    fn check_size(&self, size: u64) -> Result<(), ProofError> {
        if size > self.size() {
            return Err(ProofError(format!(
                "the tree has {} leaves, not {size}",
                self.size()
            )));
        }
        Ok(())
    }

    /// MTH of leaves `[start, end)`. Every range the RFC's recursion asks for starts at a
    /// multiple of the largest power of two not above its length, so perfect parts are stored.
    fn subtree(&self, start: u64, end: u64) -> Hash {
        let n = end - start;
        if n.is_power_of_two() {
            let level = n.trailing_zeros() as usize;
            let stored = start
                .is_multiple_of(n)
                .then(|| self.levels.get(level)?.get((start / n) as usize))
                .flatten();
            if let Some(hash) = stored {
                return *hash;
            }
            if n == 1 {
                return self.levels[0][start as usize];
            }
        }
        let k = split(n);
        node_hash(
            &self.subtree(start, start + k),
            &self.subtree(start + k, end),
        )
    }

    fn path(&self, index: u64, start: u64, end: u64, proof: &mut Vec<Hash>) {
        let n = end - start;
        if n == 1 {
            return;
        }
        let k = split(n);
        if index < start + k {
            self.path(index, start, start + k, proof);
            proof.push(self.subtree(start + k, end));
        } else {
            self.path(index, start + k, end, proof);
            proof.push(self.subtree(start, start + k));
        }
    }

    fn subproof(&self, m: u64, start: u64, end: u64, whole: bool, proof: &mut Vec<Hash>) {
        let n = end - start;
        if m == n {
            if !whole {
                proof.push(self.subtree(start, end));
            }
            return;
        }
        let k = split(n);
        if m <= k {
            self.subproof(m, start, start + k, whole, proof);
            proof.push(self.subtree(start + k, end));
        } else {
            self.subproof(m - k, start + k, end, false, proof);
            proof.push(self.subtree(start, start + k));
        }
    }
}

/// Whether `proof` shows that `leaf` is leaf `index` of the tree of `size` leaves whose root is
/// `root` (RFC 9162 section 2.1.3.2).
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f_n, mut s_n) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s_n == 0 {
            return false;
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node_hash(p, &r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    s_n == 0 && r == *root
}

/// Whether `proof` shows that the tree of `first` leaves with root `first_root` is a prefix of
/// the tree of `second` leaves with root `second_root` (RFC 9162 section 2.1.4.2).
pub fn verify_consistency(
    first: u64,
    second: u64,
    first_root: &Hash,
    second_root: &Hash,
    proof: &[Hash],
) -> bool {
    if first > second {
        return false;
    }
    if first == second {
        return proof.is_empty() && first_root == second_root;
    }
    if first == 0 {
        // Every tree extends the empty one; there is nothing to prove.
        return proof.is_empty() && *first_root == empty_root();
    }
    if proof.is_empty() {
        return false;
    }
    let mut path = proof;
    let mut start = None;
    if first.is_power_of_two() {
        start = Some(*first_root);
    }
    let first_hash = match start {
        Some(hash) => hash,
        None => {
            let (head, rest) = path.split_first().expect("proof is not empty");
            path = rest;
            *head
        }
    };
    let (mut f_n, mut s_n) = (first - 1, second - 1);
    while f_n & 1 == 1 {
        f_n >>= 1;
        s_n >>= 1;
    }
    let (mut f_r, mut s_r) = (first_hash, first_hash);
    for c in path {
        if s_n == 0 {
            return false;
        }
        if f_n & 1 == 1 || f_n == s_n {
            f_r = node_hash(c, &f_r);
            s_r = node_hash(c, &s_r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            s_r = node_hash(&s_r, c);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    f_r == *first_root && s_r == *second_root && s_n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(hex_text: &str) -> Hash {
        let bytes = hex::decode(hex_text).expect("hex");
        bytes.try_into().expect("32 bytes")
    }

    /// The Certificate Transparency reference inputs (RFC 6962 test vectors).
    const CT_LEAVES: [&str; 8] = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ];
    /// Their roots for sizes 0..=8.
    const CT_ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    fn ct_tree() -> MerkleTree {
        let mut tree = MerkleTree::new();
        for leaf in CT_LEAVES {
            tree.push(leaf_hash(&hex::decode(leaf).expect("hex")));
        }
        tree
    }

    #[test]
    fn roots_match_the_reference_vectors() {
        let tree = ct_tree();
        for (size, root) in CT_ROOTS.iter().enumerate() {
            assert_eq!(tree.root(size as u64).unwrap(), h(root), "size {size}");
        }
        assert_eq!(
            leaf_hash(&[0]),
            h("96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7")
        );
    }

    #[test]
    fn proofs_match_the_reference_vectors() {
        let tree = ct_tree();
        let inclusion = [
            (
                0,
                8,
                [
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                5,
                8,
                [
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
        ];
        for (index, size, expected) in inclusion {
            let proof = tree.inclusion_proof(index, size).unwrap();
            assert_eq!(proof, expected.map(h).to_vec(), "inclusion {index}/{size}");
        }
        let consistency: [(u64, u64, &[&str]); 2] = [
            (
                2,
                8,
                &[
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                6,
                8,
                &[
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
        ];
        for (first, second, expected) in consistency {
            let proof = tree.consistency_proof(first, second).unwrap();
            let expected: Vec<Hash> = expected.iter().map(|e| h(e)).collect();
            assert_eq!(proof, expected, "consistency {first}->{second}");
        }
    }

    /// MTH straight from RFC 6962's recursive definition, as an oracle for the stored levels.
    fn reference_root(leaves: &[Hash]) -> Hash {
        match leaves.len() {
            0 => empty_root(),
            1 => leaves[0],
            n => {
                let k = split(n as u64) as usize;
                node_hash(&reference_root(&leaves[..k]), &reference_root(&leaves[k..]))
            }
        }
    }

    fn leaves(n: u64) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&i.to_le_bytes())).collect()
    }

    #[test]
    fn roots_match_the_recursive_definition() {
        let all = leaves(300);
        let mut tree = MerkleTree::new();
        for (i, leaf) in all.iter().enumerate() {
            tree.push(*leaf);
            for size in [0, i / 2, i + 1] {
                assert_eq!(
                    tree.root(size as u64).unwrap(),
                    reference_root(&all[..size])
                );
            }
        }
    }

    #[test]
    fn requests_beyond_the_tree_are_errors() {
        let tree = ct_tree();
        assert!(tree.root(9).is_err());
        assert!(tree.inclusion_proof(8, 8).is_err());
        assert!(tree.inclusion_proof(0, 9).is_err());
        assert!(tree.consistency_proof(5, 3).is_err());
        assert!(tree.consistency_proof(1, 9).is_err());
    }

    #[test]
    fn degenerate_consistency_cases() {
        let tree = ct_tree();
        let root = |n| tree.root(n).unwrap();
        assert!(verify_consistency(0, 8, &empty_root(), &root(8), &[]));
        assert!(!verify_consistency(0, 8, &root(1), &root(8), &[]));
        assert!(verify_consistency(4, 4, &root(4), &root(4), &[]));
        assert!(!verify_consistency(4, 4, &root(4), &root(5), &[]));
        assert!(!verify_consistency(4, 4, &root(4), &root(4), &[root(1)]));
        assert!(!verify_consistency(6, 8, &root(6), &root(8), &[]));
        assert!(!verify_consistency(8, 6, &root(8), &root(6), &[]));
        assert!(!verify_inclusion(&root(1), 8, 8, &[], &root(8)));
    }
}
