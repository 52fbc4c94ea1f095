//! Knowledge-base shards: they hold their indexes in host memory and on local disk, not on
//! a GPU, so placing one is a spread over the nodes that take work: each shard goes to
//! the node holding the fewest shards, ties to the lowest node id (SCH-3).

use std::collections::BTreeMap;

/// Nodes for `count` new shards, given how many shards each candidate node holds now.
/// Empty when there is no candidate.
pub fn place_shards(holding: &BTreeMap<u64, usize>, count: usize) -> Vec<u64> {
    let mut holding = holding.clone();
    let mut placed = Vec::with_capacity(count);
    for _ in 0..count {
        let Some((&node, held)) = holding.iter_mut().min_by_key(|(node, held)| (**held, **node)) else {
            return Vec::new();
        };
        *held += 1;
        placed.push(node);
    }
    placed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_spread_over_the_least_loaded_nodes() {
        let holding = BTreeMap::from([(1, 2), (2, 0), (3, 1)]);
        assert_eq!(place_shards(&holding, 4), vec![2, 2, 3, 1]);
        assert_eq!(place_shards(&BTreeMap::from([(7, 0), (5, 0)]), 3), vec![5, 7, 5]);
        assert!(place_shards(&BTreeMap::new(), 2).is_empty());
        assert!(place_shards(&holding, 0).is_empty());
    }
}
