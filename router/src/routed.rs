//! What each backend probably holds in its prefix cache, as the router can know it without
//! the model's tokenizer: the prompts it sent there. A prompt's canonical bytes are cut into
//! 64-byte chunks named by a hash chained over them (as a worker names its KV blocks by a
//! hash chained over their tokens), and each backend keeps the names it was sent, least
//! recently used out first, up to what its KV cache can hold (its reported capacity in
//! tokens, at the bytes per token seen in answered requests). The `cache-aware` policy sends
//! a request where the longest run of its leading chunks is.

use std::collections::{BTreeSet, HashMap};

use crate::policy::stable_hash;

/// Bytes per chunk: about a KV block's 16 tokens of text.
pub const CHUNK_BYTES: usize = 64;

/// The chained names of `prompt`'s whole chunks: a chunk's name stands for every byte up to
/// its end.
pub fn chunk_names(prompt: &[u8]) -> Vec<u64> {
    let mut previous = 0u64;
    prompt
        .chunks_exact(CHUNK_BYTES)
        .map(|chunk| {
            let mut bytes = Vec::with_capacity(8 + CHUNK_BYTES);
            bytes.extend_from_slice(&previous.to_le_bytes());
            bytes.extend_from_slice(chunk);
            previous = stable_hash(&bytes);
            previous
        })
        .collect()
}

/// The chunks sent to one backend, with when each was last sent.
#[derive(Default)]
pub struct RoutedChunks {
    last_sent: HashMap<u64, u64>,
    /// `(tick, name)`, oldest first.
    by_age: BTreeSet<(u64, u64)>,
}

impl RoutedChunks {
    /// How many of `names` lead in a row here, and when the last of those was sent (0 for
    /// none): of two backends sent the same prefix, the one sent it last is likelier to
    /// still hold it.
    pub fn leading(&self, names: &[u64]) -> (usize, u64) {
        names
            .iter()
            .map_while(|name| self.last_sent.get(name))
            .fold((0, 0), |(count, _), &sent| (count + 1, sent))
    }

    /// Records `names` as sent at `tick` (later than any before), then forgets the least
    /// recently sent beyond `capacity` chunks.
    pub fn record(&mut self, names: &[u64], tick: u64, capacity: usize) {
        for &name in names {
            if let Some(old) = self.last_sent.insert(name, tick) {
                self.by_age.remove(&(old, name));
            }
            self.by_age.insert((tick, name));
        }
        while self.last_sent.len() > capacity {
            let Some((_, name)) = self.by_age.pop_first() else {
                break;
            };
            self.last_sent.remove(&name);
        }
    }

    pub fn len(&self) -> usize {
        self.last_sent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_sent.is_empty()
    }
}

/// Chunks a backend's KV cache holds: `kv_tokens` at `bytes_per_token`.
pub fn capacity_chunks(kv_tokens: usize, bytes_per_token: f64) -> usize {
    (kv_tokens as f64 * bytes_per_token / CHUNK_BYTES as f64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(seed: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| seed.wrapping_add(i as u8)).collect()
    }

    #[test]
    fn chunk_names_chain_so_a_name_stands_for_its_whole_prefix() {
        let a = prompt(1, 200);
        let names = chunk_names(&a);
        assert_eq!(names.len(), 3, "whole chunks only");
        let mut b = a.clone();
        b[10] ^= 1;
        let other = chunk_names(&b);
        // A change in the first chunk renames every chunk after it.
        assert!(names.iter().zip(&other).all(|(x, y)| x != y));
        let mut c = a.clone();
        c[150] ^= 1;
        assert_eq!(chunk_names(&c)[..2], names[..2]);
        assert_ne!(chunk_names(&c)[2], names[2]);
    }

    #[test]
    fn the_least_recently_sent_go_first_when_over_capacity() {
        let (x, y) = (chunk_names(&prompt(1, 256)), chunk_names(&prompt(9, 256)));
        let mut routed = RoutedChunks::default();
        routed.record(&x, 1, 8);
        routed.record(&y, 2, 8);
        assert_eq!((routed.leading(&x), routed.leading(&y)), ((4, 1), (4, 2)));
        // x sent again is the newest; a third prompt pushes y out.
        routed.record(&x, 3, 8);
        let z = chunk_names(&prompt(20, 256));
        routed.record(&z, 4, 8);
        assert_eq!(routed.len(), 8);
        assert_eq!(
            (routed.leading(&x), routed.leading(&y), routed.leading(&z)),
            ((4, 3), (0, 0), (4, 4))
        );
        // A longer prompt that starts like x matches x's chunks and no more.
        let longer = chunk_names(&[prompt(1, 256), prompt(50, 128)].concat());
        assert_eq!(routed.leading(&longer), (4, 3));
    }

    #[test]
    fn capacity_is_the_kv_cache_in_chunks() {
        assert_eq!(capacity_chunks(4096 * 16, 4.0), 4096);
        assert_eq!(capacity_chunks(0, 4.0), 0);
    }
}
