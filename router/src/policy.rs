//! Where a request goes, as a pure function of what the router knows: first a pool (by
//! weight among pools that can take it, preference order when only weight-0 pools can:
//! those take spill-over only), then a backend within it:
//!
//! - `least-load`: the backend with the least outstanding work;
//! - `prefix-affinity`: consistent hashing with bounded loads on the prompt prefix, so
//!   requests sharing a prefix land where its KV cache is while no backend takes more than
//!   1.25× the pool's average;
//! - `cache-aware`: the backend that was sent the longest run of the prompt's leading
//!   chunks and still has room for them (`routed.rs`), within the same load bound; least
//!   load when none was;
//! - `weighted`: smooth weighted round-robin by backend weight, ignoring load.
//!
//! A backend can take a request when it is healthy and (except under `weighted`) has fewer
//! than `max_in_flight` streams open: a saturated pool spills to the next.

/// Routing policy (`--policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    LeastLoad,
    PrefixAffinity,
    CacheAware,
    Weighted,
}

/// What the policy sees of one backend.
#[derive(Clone, Debug)]
pub struct View<'a> {
    pub pool: &'a str,
    pub weight: u32,
    pub healthy: bool,
    /// Outstanding work (sequences waiting or running).
    pub load: usize,
    /// Streams this router has open on it.
    pub in_flight: usize,
    /// Leading chunks of the request's prompt it was sent and is thought to hold, and when
    /// the last of them was sent (`cache-aware` only).
    pub cached: (usize, u64),
}

/// Points per backend on the hash ring: enough to spread keys evenly over a few backends.
const RING_POINTS: usize = 64;
/// A backend takes affinity traffic up to this multiple of its pool's average load.
const AFFINITY_LOAD_BOUND: f64 = 1.25;
/// ... and `cache-aware` traffic up to this many requests more than the least loaded
/// member has, however small the loads: a few requests' wait costs less than prefilling a
/// long prompt again elsewhere (SGLang's cache-aware router has an absolute threshold too).
const CACHE_AWARE_SLACK: usize = 2;

pub struct Picker {
    policy: Policy,
    /// `(name, weight)` in preference order.
    pools: Vec<(String, u32)>,
    max_in_flight: usize,
    /// Smooth weighted round-robin credit per pool and per backend.
    pool_credit: Vec<i64>,
    backend_credit: Vec<i64>,
    /// `(hash, backend)`, sorted by hash.
    ring: Vec<(u64, usize)>,
    /// Per pool, rotates ties between equally loaded backends.
    turns: Vec<usize>,
}

impl Picker {
    /// `pools` in preference order; pools that only backends name are appended with weight 1.
    /// `addrs` are the backends' addresses (their points on the hash ring).
    pub fn new(
        policy: Policy,
        mut pools: Vec<(String, u32)>,
        backends: &[(&str, &str)],
        max_in_flight: usize,
    ) -> Self {
        for (pool, _) in backends {
            if !pools.iter().any(|(name, _)| name == pool) {
                pools.push((pool.to_string(), 1));
            }
        }
        let mut ring: Vec<(u64, usize)> = backends
            .iter()
            .enumerate()
            .flat_map(|(i, (_, addr))| {
                (0..RING_POINTS).map(move |k| (stable_hash(format!("{addr}#{k}").as_bytes()), i))
            })
            .collect();
        ring.sort_unstable();
        Picker {
            policy,
            pool_credit: vec![0; pools.len()],
            turns: vec![0; pools.len()],
            backend_credit: vec![0; backends.len()],
            pools,
            max_in_flight,
            ring,
        }
    }

    /// The backend for a request with prefix hash `key`, never one in `exclude` (backends
    /// already tried); None when no backend can take it.
    pub fn pick(
        &mut self,
        backends: &[View],
        key: Option<u64>,
        exclude: &[usize],
    ) -> Option<usize> {
        let can_take = |i: usize| {
            let b = &backends[i];
            b.healthy
                && !exclude.contains(&i)
                && (self.policy == Policy::Weighted || b.in_flight < self.max_in_flight)
        };
        let open: Vec<bool> = (0..backends.len()).map(can_take).collect();
        let pool_open: Vec<bool> = self
            .pools
            .iter()
            .map(|(name, _)| (0..backends.len()).any(|i| open[i] && backends[i].pool == name))
            .collect();
        let weights: Vec<u32> = self.pools.iter().map(|(_, w)| *w).collect();
        let pool = smooth_weighted(&mut self.pool_credit, &weights, &pool_open)
            .or_else(|| pool_open.iter().position(|&o| o))?;
        let members: Vec<usize> = (0..backends.len())
            .filter(|&i| open[i] && backends[i].pool == self.pools[pool].0)
            .collect();
        let turn = self.turns[pool];
        self.turns[pool] = turn.wrapping_add(1);
        match (self.policy, key) {
            (Policy::Weighted, _) => {
                let weights: Vec<u32> = backends.iter().map(|b| b.weight.max(1)).collect();
                smooth_weighted(
                    &mut self.backend_credit,
                    &weights,
                    &open_only(&members, backends.len()),
                )
            }
            (Policy::PrefixAffinity, Some(key)) => Some(self.by_affinity(backends, &members, key)),
            (Policy::CacheAware, _) => Some(by_cached_prefix(backends, &members, turn)),
            _ => Some(least_loaded(backends, &members, turn)),
        }
    }

    /// Consistent hashing with bounded loads: the first backend clockwise from `key` whose
    /// load stays within the bound after taking this request.
    fn by_affinity(&self, backends: &[View], members: &[usize], key: u64) -> usize {
        let bound = load_bound(backends, members);
        let start = self.ring.partition_point(|&(h, _)| h < key);
        let clockwise = self.ring[start..].iter().chain(&self.ring[..start]);
        clockwise
            .map(|&(_, i)| i)
            .find(|i| members.contains(i) && backends[*i].load < bound)
            .unwrap_or_else(|| least_loaded(backends, members, 0))
    }
}

/// The load under which a backend still takes affinity traffic: 1.25× the members' average
/// once this request is added.
fn load_bound(backends: &[View], members: &[usize]) -> usize {
    let total: usize = members.iter().map(|&i| backends[i].load).sum();
    (AFFINITY_LOAD_BOUND * (total + 1) as f64 / members.len() as f64).ceil() as usize
}

/// The member holding the most leading chunks of the prompt (sent them last, on a tie)
/// among those within the load bound; the least loaded when none holds any.
fn by_cached_prefix(backends: &[View], members: &[usize], turn: usize) -> usize {
    let least = members.iter().map(|&i| backends[i].load).min().unwrap_or(0);
    let bound = load_bound(backends, members).max(least + CACHE_AWARE_SLACK);
    members
        .iter()
        .copied()
        .filter(|&i| backends[i].cached.0 > 0 && backends[i].load < bound)
        .max_by_key(|&i| backends[i].cached)
        .unwrap_or_else(|| least_loaded(backends, members, turn))
}

fn open_only(members: &[usize], n: usize) -> Vec<bool> {
    (0..n).map(|i| members.contains(&i)).collect()
}

/// The member with the least load; ties go round-robin from `turn`.
fn least_loaded(backends: &[View], members: &[usize], turn: usize) -> usize {
    let n = members.len();
    (0..n)
        .map(|k| members[(k + turn) % n])
        .min_by_key(|&i| (backends[i].load, backends[i].in_flight))
        .expect("a chosen pool has members")
}

/// nginx's smooth weighted round-robin over the open entries with weight > 0: every open
/// entry gains its weight, the richest is chosen and pays the total. Spreads exactly by
/// weight, interleaved (3:1 gives a a b a, not a a a b).
fn smooth_weighted(credit: &mut [i64], weights: &[u32], open: &[bool]) -> Option<usize> {
    let eligible = |i: usize| open[i] && weights[i] > 0;
    let total: i64 = (0..weights.len())
        .filter(|&i| eligible(i))
        .map(|i| i64::from(weights[i]))
        .sum();
    if total == 0 {
        return None;
    }
    let mut best = None;
    for i in (0..weights.len()).filter(|&i| eligible(i)) {
        credit[i] += i64::from(weights[i]);
        if best.is_none_or(|b: usize| credit[i] > credit[b]) {
            best = Some(i);
        }
    }
    let best = best?;
    credit[best] -= total;
    Some(best)
}

/// A stable 64-bit hash for ring points and prompt prefixes, the same in every router
/// replica and version: FNV-1a, then MurmurHash3's finaliser, without which inputs that
/// differ in their last bytes land close together on the ring.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h = bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn views<'a>(pools: &[&'a str], loads: &[usize]) -> Vec<View<'a>> {
        pools
            .iter()
            .zip(loads)
            .map(|(&pool, &load)| View {
                pool,
                weight: 1,
                healthy: true,
                load,
                in_flight: load,
                cached: (0, 0),
            })
            .collect()
    }

    fn picker(policy: Policy, pools: &[(&str, u32)], backends: &[&str]) -> Picker {
        let addrs: Vec<String> = (0..backends.len())
            .map(|i| format!("10.0.0.{i}:50051"))
            .collect();
        let specs: Vec<(&str, &str)> = backends
            .iter()
            .zip(&addrs)
            .map(|(p, a)| (*p, a.as_str()))
            .collect();
        Picker::new(
            policy,
            pools.iter().map(|(n, w)| (n.to_string(), *w)).collect(),
            &specs,
            8,
        )
    }

    fn count(picks: impl Iterator<Item = Option<usize>>, n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for i in picks {
            counts[i.expect("a backend")] += 1;
        }
        counts
    }

    #[test]
    fn pools_get_traffic_by_weight_interleaved() {
        let pools = ["h100", "h100", "a100"];
        let mut p = picker(Policy::LeastLoad, &[("h100", 3), ("a100", 1)], &pools);
        let idle = views(&pools, &[0, 0, 0]);
        let first: Vec<&str> = (0..4)
            .map(|_| pools[p.pick(&idle, None, &[]).unwrap()])
            .collect();
        assert_eq!(first, ["h100", "h100", "a100", "h100"]);
        let counts = count((0..3996).map(|_| p.pick(&idle, None, &[])), 3);
        assert_eq!(counts[0] + counts[1], 2997);
        assert_eq!(counts[2], 999);
        // equal loads share the pool evenly
        assert!(counts[0].abs_diff(counts[1]) <= 1, "{counts:?}");
    }

    #[test]
    fn a_saturated_or_unhealthy_pool_spills_and_weight_zero_pools_take_only_spill() {
        let pools = ["h100", "a100", "cpu"];
        let mut p = picker(
            Policy::LeastLoad,
            &[("h100", 1), ("a100", 1), ("cpu", 0)],
            &pools,
        );
        let mut v = views(&pools, &[0, 0, 0]);
        let counts = count((0..100).map(|_| p.pick(&v, None, &[])), 3);
        assert_eq!(counts, [50, 50, 0]);
        v[0].in_flight = 8; // at max_in_flight
        v[1].healthy = false;
        assert_eq!(p.pick(&v, None, &[]), Some(2));
        v[2].in_flight = 8;
        assert_eq!(p.pick(&v, None, &[]), None);
    }

    #[test]
    fn least_load_takes_the_idlest_and_skips_excluded_backends() {
        let pools = ["p"; 3];
        let mut p = picker(Policy::LeastLoad, &[], &pools);
        let v = views(&pools, &[5, 1, 3]);
        assert_eq!(p.pick(&v, None, &[]), Some(1));
        assert_eq!(p.pick(&v, None, &[1]), Some(2));
        assert_eq!(p.pick(&v, None, &[0, 1, 2]), None);
    }

    #[test]
    fn prefix_affinity_keeps_a_prefix_on_one_backend_within_the_load_bound() {
        let pools = ["p"; 4];
        let mut p = picker(Policy::PrefixAffinity, &[], &pools);
        let mut v = views(&pools, &[2, 2, 2, 2]);
        let keys: Vec<u64> = (0..200)
            .map(|k| stable_hash(format!("system prompt {k}").as_bytes()))
            .collect();
        let homes: Vec<usize> = keys
            .iter()
            .map(|&k| p.pick(&v, Some(k), &[]).unwrap())
            .collect();
        for (&k, &home) in keys.iter().zip(&homes) {
            assert_eq!(
                p.pick(&v, Some(k), &[]),
                Some(home),
                "same prefix, same backend"
            );
        }
        let spread = count(homes.iter().map(|&h| Some(h)), 4);
        assert!(
            spread.iter().all(|&c| c >= 20),
            "keys spread over the ring: {spread:?}"
        );
        // An overloaded home sheds its keys to the next backend on the ring.
        let home = homes[0];
        v[home].load = 20;
        let moved = p.pick(&v, Some(keys[0]), &[]).unwrap();
        assert_ne!(moved, home);
    }

    #[test]
    fn cache_aware_goes_where_most_of_the_prefix_is_within_the_load_bound() {
        let pools = ["p"; 3];
        let mut p = picker(Policy::CacheAware, &[], &pools);
        let mut v = views(&pools, &[2, 1, 2]);
        // Nobody holds it: least load.
        assert_eq!(p.pick(&v, None, &[]), Some(1));
        v[0].cached = (3, 10);
        v[2].cached = (7, 5);
        assert_eq!(p.pick(&v, None, &[]), Some(2), "the longest run wins");
        assert_eq!(p.pick(&v, None, &[2]), Some(0), "then the next longest");
        v[0].cached = (7, 9);
        assert_eq!(
            p.pick(&v, None, &[]),
            Some(0),
            "on a tie, the one sent it last"
        );
        // At small loads the bound is two more than the least loaded...
        v[0].load = 5;
        assert_eq!(p.pick(&v, None, &[]), Some(2));
        v[2].load = 5;
        assert_eq!(p.pick(&v, None, &[]), Some(1));
        // ... and 1.25 × the average (with this request) at large ones.
        let mut v = views(&pools, &[40, 30, 30]);
        // (load reported by the workers, from every router: our own streams are few)
        v.iter_mut().for_each(|b| b.in_flight = 1);
        v[0].cached = (7, 9);
        assert_eq!(p.pick(&v, None, &[]), Some(0));
        v[0].load = 45;
        assert_ne!(p.pick(&v, None, &[]), Some(0));
    }

    #[test]
    fn weighted_ignores_load_and_spreads_by_backend_weight() {
        let pools = ["p"; 2];
        let mut p = picker(Policy::Weighted, &[], &pools);
        let mut v = views(&pools, &[100, 0]);
        v[0].weight = 3;
        v[0].in_flight = 100; // saturation does not apply
        let counts = count((0..400).map(|_| p.pick(&v, None, &[])), 2);
        assert_eq!(counts, [300, 100]);
    }
}
