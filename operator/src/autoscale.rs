//! The autoscaler's decision (pure): from the load its routers reported over time, how many
//! groups a deployment runs. The pools share that total as they share `spec.replicas`
//! (`resolve::pool_replicas`): each its minimum, then by weight, highest first, up to its
//! maximum or, when it is full (a group could not be scheduled), to what it holds, so the
//! preferred pool fills first and the next takes the spill-over; scaling down empties them
//! in reverse.

use crate::api::{AutoscalingSpec, PoolSpec};

/// The deployment's load at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    /// Seconds since any fixed start.
    pub at: f64,
    /// Requests running and waiting on all its workers, and held by its routers.
    pub requests: u64,
    /// Share of the KV cache in use over its serving ranks (0 to 1; 0 when none serves).
    pub kv_cache_usage: f64,
}

impl Sample {
    /// The load its routers reported at `at`.
    pub fn of(at: f64, routers: &[RouterLoad]) -> Self {
        Sample {
            at,
            requests: deployment_requests(routers),
            kv_cache_usage: deployment_kv_cache_usage(routers),
        }
    }
}

/// Adds `sample` (none when no router answered: the load is unknown, not zero) and forgets
/// what the windows no longer reach, keeping one sample older than the longest so that the
/// history covers it.
pub fn remember(
    history: &mut Vec<Sample>,
    sample: Option<Sample>,
    spec: &AutoscalingSpec,
    now: f64,
) {
    history.extend(sample);
    let reach = f64::from(
        spec.scale_up_window_seconds
            .max(spec.scale_down_window_seconds)
            .max(spec.scale_to_zero_after_seconds.unwrap_or(0)),
    );
    while history.len() > 1 && history[1].at <= now - reach {
        history.remove(0);
    }
}

/// What one router replica's `/metrics` page says of the load.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouterLoad {
    /// Requests it holds until some backend is healthy.
    pub waiting: u64,
    /// Requests running or waiting on each pool's healthy ranks.
    pub pools: Vec<(String, u64)>,
    /// Each pool's healthy ranks and the share of their KV cache in use.
    pub kv: Vec<(String, u64, f64)>,
}

impl RouterLoad {
    /// Reads the `deepseek_router_waiting_requests` and `deepseek_router_pool_requests`
    /// gauges; other lines are skipped.
    pub fn parse(page: &str) -> Self {
        let mut load = RouterLoad::default();
        for line in page.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let pool = |gauge: &str| {
                series
                    .strip_prefix(gauge)?
                    .strip_prefix("{pool=\"")?
                    .strip_suffix("\"}")
                    .map(str::to_string)
            };
            // Gauges of counts are whole and non-negative.
            let count = value.max(0.0) as u64;
            if series == "deepseek_router_waiting_requests" {
                load.waiting = count;
            } else if let Some(pool) = pool("deepseek_router_pool_requests") {
                load.pools.push((pool, count));
            } else if let Some(pool) = pool("deepseek_router_pool_healthy_ranks") {
                kv_entry(&mut load.kv, pool).1 = count;
            } else if let Some(pool) = pool("deepseek_router_pool_kv_cache_usage") {
                kv_entry(&mut load.kv, pool).2 = value.clamp(0.0, 1.0);
            }
        }
        load
    }
}

fn kv_entry(kv: &mut Vec<(String, u64, f64)>, pool: String) -> &mut (String, u64, f64) {
    let at = match kv.iter().position(|(name, _, _)| *name == pool) {
        Some(at) => at,
        None => {
            kv.push((pool, 0, 0.0));
            kv.len() - 1
        }
    };
    &mut kv[at]
}

/// The share of the deployment's KV cache in use: each pool's share (the most any replica
/// reports) weighted by its serving ranks; 0 when none serves.
pub fn deployment_kv_cache_usage(routers: &[RouterLoad]) -> f64 {
    let mut pools: Vec<(&str, u64, f64)> = Vec::new();
    for (pool, ranks, usage) in routers.iter().flat_map(|r| &r.kv) {
        match pools.iter_mut().find(|(name, _, _)| name == pool) {
            Some(seen) => {
                seen.1 = seen.1.max(*ranks);
                seen.2 = seen.2.max(*usage);
            }
            None => pools.push((pool, *ranks, *usage)),
        }
    }
    let ranks: u64 = pools.iter().map(|p| p.1).sum();
    if ranks == 0 {
        return 0.0;
    }
    pools.iter().map(|p| p.1 as f64 * p.2).sum::<f64>() / ranks as f64
}

/// The deployment's requests from its router replicas: what each holds (they hold different
/// requests: summed), plus what runs on the pools (every replica sees the same workers: the
/// most any reports, pool by pool).
pub fn deployment_requests(routers: &[RouterLoad]) -> u64 {
    let held: u64 = routers.iter().map(|r| r.waiting).sum();
    let mut pools: Vec<(&str, u64)> = Vec::new();
    for (pool, requests) in routers.iter().flat_map(|r| &r.pools) {
        match pools.iter_mut().find(|(name, _)| name == pool) {
            Some((_, most)) => *most = (*most).max(*requests),
            None => pools.push((pool, *requests)),
        }
    }
    held + pools.iter().map(|(_, requests)| requests).sum::<u64>()
}

/// How many groups, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub groups: i32,
    pub reason: String,
}

/// The fewest and most groups the pools hold together; `None` when a pool has no
/// `maxReplicas` (the autoscaler needs a ceiling).
pub fn bounds(pools: &[PoolSpec]) -> Option<(i32, i32)> {
    let min = pools.iter().map(|p| p.min_replicas.unwrap_or(0)).sum();
    let max = pools.iter().map(|p| p.max_replicas).sum::<Option<i32>>()?;
    Some((min, max))
}

/// How far the load may stray from what the current groups are meant to hold before it
/// calls for another count (the HorizontalPodAutoscaler's default tolerance): per-rank loads
/// are read a second apart, so a load right at a group boundary would otherwise flap.
const TOLERANCE: f64 = 0.1;

/// Groups a sample calls for: its requests at `targetRequestsPerGroup`, or, with
/// `targetKvCachePercent`, the groups that would bring the KV cache use of the `current`
/// groups down to that target, whichever is more (as an HPA with two metrics). A need within
/// `TOLERANCE` of the current groups calls for them.
fn called_for(sample: &Sample, spec: &AutoscalingSpec, current: i32) -> i32 {
    let by_requests = sample.requests as f64 / f64::from(spec.target_requests_per_group.max(1));
    let by_kv_cache = spec.target_kv_cache_percent.map_or(0.0, |percent| {
        f64::from(current) * sample.kv_cache_usage * 100.0 / f64::from(percent.max(1))
    });
    let needed = by_requests.max(by_kv_cache);
    let current = f64::from(current);
    if current > 0.0 && (needed / current - 1.0).abs() <= TOLERANCE {
        return current as i32;
    }
    needed.ceil().min(f64::from(i32::MAX)) as i32
}

/// The groups to run now, `current` running, given the samples up to `now` (oldest first),
/// while `starting` (some group not ready yet).
/// - Up: to the fewest groups the load called for at every sample of the scale-up window;
///   from zero, at once on the first request (it is being held).
/// - Down: to the most it called for during the scale-down window, once the history covers
///   that window, and not while a group starts (its load is not yet served, and a group
///   takes minutes to start: tearing one down then wastes them).
/// - To zero, with `scaleToZeroAfterSeconds` and pools that allow it: after that long
///   without a request; otherwise never below one group.
pub fn decide(
    spec: &AutoscalingSpec,
    (min, max): (i32, i32),
    current: i32,
    history: &[Sample],
    now: f64,
    starting: bool,
) -> Decision {
    let may_rest_at_zero = min == 0 && spec.scale_to_zero_after_seconds.is_some();
    let floor = if may_rest_at_zero && current == 0 {
        0
    } else {
        min.max(1)
    };
    let clamp = |groups: i32| groups.clamp(floor, max.max(floor));
    let within = |window: i32| {
        history
            .iter()
            .filter(move |s| s.at >= now - f64::from(window))
    };
    let covers = |window: i32| {
        history
            .first()
            .is_some_and(|s| s.at <= now - f64::from(window))
    };
    let called = |window: i32| within(window).map(|s| called_for(s, spec, current));
    let last = history.last().copied().unwrap_or_default();
    let requests = last.requests;
    let per_group = spec.target_requests_per_group;
    let load = match spec.target_kv_cache_percent {
        Some(percent) => format!(
            "{requests} requests at {per_group} a group, KV cache {:.0}% used against {percent}%",
            last.kv_cache_usage * 100.0
        ),
        None => format!("{requests} requests at {per_group} a group"),
    };
    let decision = |groups, reason| Decision { groups, reason };
    if current == 0 && requests > 0 {
        let groups = called_for(&last, spec, 0).clamp(1, max.max(1));
        return decision(
            groups,
            format!("woken from zero by {requests} waiting requests"),
        );
    }
    let up = called(spec.scale_up_window_seconds).min().map(clamp);
    if let Some(up) = up.filter(|&up| up > current) {
        return decision(
            up,
            format!(
                "{load} call for {up} (for {} s)",
                spec.scale_up_window_seconds
            ),
        );
    }
    if let Some(idle) = spec
        .scale_to_zero_after_seconds
        .filter(|_| may_rest_at_zero)
        && current > 0
        && covers(idle)
        && within(idle).all(|s| s.requests == 0)
    {
        return decision(0, format!("no request for {idle} s"));
    }
    let down = called(spec.scale_down_window_seconds)
        .max()
        .filter(|_| covers(spec.scale_down_window_seconds) && !starting)
        .map(clamp);
    if let Some(down) = down.filter(|&down| down < current) {
        return decision(
            down,
            format!(
                "at most {down} groups called for during the last {} s",
                spec.scale_down_window_seconds
            ),
        );
    }
    if clamp(current) != current {
        return decision(
            clamp(current),
            format!("kept within the pools' {floor}..{max} groups"),
        );
    }
    decision(
        current,
        format!("{requests} requests at {per_group} a group"),
    )
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::resolve::pool_replicas;

    fn spec(up: i32, down: i32) -> AutoscalingSpec {
        AutoscalingSpec {
            target_requests_per_group: 10,
            scale_up_window_seconds: up,
            scale_down_window_seconds: down,
            scale_to_zero_after_seconds: None,
            hold_requests_seconds: 60,
            target_kv_cache_percent: None,
        }
    }

    /// Runs a load trace (requests each second) through the autoscaler, applying each
    /// decision, and gives the groups after every second.
    fn follow(spec: &AutoscalingSpec, bounds: (i32, i32), start: i32, trace: &[u64]) -> Vec<i32> {
        let mut history = Vec::new();
        let mut groups = start;
        trace
            .iter()
            .enumerate()
            .map(|(second, &requests)| {
                let now = second as f64;
                history.push(Sample {
                    at: now,
                    requests,
                    ..Default::default()
                });
                groups = decide(spec, bounds, groups, &history, now, false).groups;
                groups
            })
            .collect()
    }

    #[test]
    fn steady_load_keeps_its_groups() {
        assert_eq!(follow(&spec(0, 5), (1, 4), 2, &[20; 10]), [2; 10]);
    }

    #[test]
    fn a_ramp_adds_groups_as_it_climbs_up_to_the_ceiling() {
        let ramp = [5, 15, 25, 35, 45, 55];
        assert_eq!(follow(&spec(0, 60), (1, 4), 1, &ramp), [1, 2, 3, 4, 4, 4]);
    }

    #[test]
    fn a_spike_shorter_than_the_scale_up_window_adds_nothing() {
        let spike = [10, 10, 40, 40, 10, 10, 40, 40, 40, 40];
        assert_eq!(
            follow(&spec(2, 60), (1, 4), 1, &spike),
            [1, 1, 1, 1, 1, 1, 1, 1, 4, 4]
        );
        // Without a window the spike is followed at once.
        assert_eq!(follow(&spec(0, 60), (1, 4), 1, &spike)[2], 4);
    }

    #[test]
    fn idle_load_scales_down_after_the_window_and_not_below_one_group() {
        let mut trace = vec![40; 3];
        trace.extend([0; 8]);
        // 40 requests: 4 groups; then idle, and the 5 s window must pass with no more than
        // zero called for (it holds 4 until the busy samples leave it).
        assert_eq!(
            follow(&spec(0, 5), (0, 4), 4, &trace),
            [4, 4, 4, 4, 4, 4, 4, 4, 1, 1, 1]
        );
    }

    #[test]
    fn no_scale_down_before_the_history_covers_the_window() {
        assert_eq!(follow(&spec(0, 5), (1, 4), 3, &[0; 5]), [3; 5]);
        assert_eq!(follow(&spec(0, 5), (1, 4), 3, &[0; 7])[6], 1);
    }

    #[test]
    fn the_count_stays_within_the_pools_bounds() {
        let spec = spec(0, 0);
        let at = |requests| {
            [Sample {
                requests,
                ..Default::default()
            }]
        };
        assert_eq!(decide(&spec, (2, 3), 5, &at(50), 0.0, false).groups, 3);
        assert_eq!(decide(&spec, (2, 3), 1, &at(50), 0.0, false).groups, 3);
        assert_eq!(decide(&spec, (2, 3), 3, &at(0), 0.0, false).groups, 2);
    }

    #[test]
    fn a_deployment_at_zero_wakes_on_its_first_request_at_once() {
        let mut spec = spec(30, 60);
        spec.scale_to_zero_after_seconds = Some(5);
        // At zero and idle it stays there; one held request wakes a group despite the
        // 30 s scale-up window; 25 wake three (at 10 a group).
        assert_eq!(follow(&spec, (0, 3), 0, &[0, 0, 1, 1]), [0, 0, 1, 1]);
        assert_eq!(follow(&spec, (0, 3), 0, &[0, 25])[1], 3);
    }

    #[test]
    fn idle_for_the_zero_window_scales_to_zero_and_only_when_asked_to() {
        let mut zeroing = spec(0, 3);
        zeroing.scale_to_zero_after_seconds = Some(6);
        let mut trace = vec![5, 5];
        trace.extend([0; 9]);
        // Down to one after the 3 s window, to zero once 6 s passed without a request.
        assert_eq!(
            follow(&zeroing, (0, 3), 1, &trace),
            [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]
        );
        // Without scaleToZeroAfterSeconds, or with a pool's minReplicas above 0: one stays.
        assert_eq!(follow(&spec(0, 3), (0, 3), 1, &trace)[10], 1);
        assert_eq!(follow(&zeroing, (1, 3), 1, &trace)[10], 1);
    }

    #[test]
    fn no_group_is_taken_down_while_another_starts() {
        let spec = spec(0, 2);
        let history: Vec<Sample> = (0..5)
            .map(|at| Sample {
                at: f64::from(at),
                ..Default::default()
            })
            .collect();
        assert_eq!(decide(&spec, (1, 4), 3, &history, 4.0, true).groups, 3);
        assert_eq!(decide(&spec, (1, 4), 3, &history, 4.0, false).groups, 1);
    }

    #[test]
    fn the_load_is_what_the_routers_hold_plus_what_the_pools_run() {
        let page = |waiting, h100, a100| {
            format!(
                "# HELP deepseek_router_waiting_requests Requests held.\n\
                 # TYPE deepseek_router_waiting_requests gauge\n\
                 deepseek_router_waiting_requests {waiting}\n\
                 deepseek_router_pool_requests{{pool=\"h100\"}} {h100}\n\
                 deepseek_router_pool_requests{{pool=\"a100\"}} {a100}\n\
                 deepseek_router_pool_healthy_ranks{{pool=\"h100\"}} 16\n\
                 # EOF\n"
            )
        };
        let one = RouterLoad::parse(&page(2, 30, 4));
        assert_eq!(
            one,
            RouterLoad {
                waiting: 2,
                pools: vec![("h100".into(), 30), ("a100".into(), 4)],
                kv: vec![("h100".into(), 16, 0.0)],
            }
        );
        // Two replicas see the same pools (a moment apart) and hold their own requests.
        let other = RouterLoad::parse(&page(3, 28, 5));
        assert_eq!(deployment_requests(&[one, other]), 2 + 3 + 30 + 5);
        assert_eq!(deployment_requests(&[]), 0);
    }

    #[test]
    fn a_ramp_fills_the_heavier_pool_first_and_spills_from_it_when_it_is_full() {
        let pool = |name: &str, weight| PoolSpec {
            max_replicas: Some(3),
            ..serde_json::from_value(serde_json::json!({"name": name, "weight": weight})).unwrap()
        };
        // Listed lighter first: the weight decides.
        let pools = [pool("a100", 1), pool("h100", 3)];
        let ramp = [5, 15, 25, 35, 45, 0];
        let totals = follow(&spec(0, 0), bounds(&pools).unwrap(), 1, &ramp);
        assert_eq!(totals, [1, 2, 3, 4, 5, 1]);
        let shares = |full: &BTreeMap<String, i32>| -> Vec<Vec<i32>> {
            let share = |&total| pool_replicas(Some(total), &pools, full);
            totals.iter().map(share).collect()
        };
        assert_eq!(
            shares(&BTreeMap::new()),
            [[0, 1], [0, 2], [0, 3], [1, 3], [2, 3], [0, 1]]
        );
        // h100's second group stayed unschedulable: full at one, the rest goes to a100.
        let h100_full = BTreeMap::from([("h100".to_string(), 1)]);
        assert_eq!(
            shares(&h100_full),
            [[0, 1], [1, 1], [2, 1], [3, 1], [3, 1], [0, 1]]
        );
    }

    #[test]
    fn a_load_within_the_tolerance_of_the_groups_keeps_them() {
        // Two groups of 10: 21 requests is within 10%, 23 is not.
        assert_eq!(follow(&spec(0, 0), (1, 4), 2, &[21, 21]), [2, 2]);
        assert_eq!(follow(&spec(0, 0), (1, 4), 2, &[23]), [3]);
        // And down: 19 keeps two, 15 calls for two as well (1.5 rounds up), 9 for one.
        assert_eq!(follow(&spec(0, 0), (1, 4), 2, &[19, 15, 9]), [2, 2, 1]);
    }

    #[test]
    fn kv_cache_use_above_its_target_adds_groups_that_requests_alone_would_not() {
        let page = "deepseek_router_pool_healthy_ranks{pool=\"h100\"} 12\n\
                    deepseek_router_pool_kv_cache_usage{pool=\"h100\"} 0.9\n\
                    deepseek_router_pool_healthy_ranks{pool=\"a100\"} 4\n\
                    deepseek_router_pool_kv_cache_usage{pool=\"a100\"} 0.5\n";
        let sample = Sample::of(0.0, &[RouterLoad::parse(page)]);
        // Weighted by serving ranks: (12 × 0.9 + 4 × 0.5) / 16.
        assert!((sample.kv_cache_usage - 0.8).abs() < 1e-9, "{sample:?}");
        let mut spec = spec(0, 60);
        spec.target_kv_cache_percent = Some(50);
        // Few requests (one group's worth), but two groups at 80% against 50%: four.
        let busy = Sample {
            requests: 5,
            ..sample
        };
        let decision = decide(&spec, (1, 6), 2, &[busy], 0.0, false);
        assert_eq!(decision.groups, 4, "{decision:?}");
        assert!(
            decision.reason.contains("KV cache 80% used against 50%"),
            "{decision:?}"
        );
        // Without the target the requests call for one group (the 60 s window keeps two).
        spec.target_kv_cache_percent = None;
        assert_eq!(decide(&spec, (1, 6), 2, &[busy], 0.0, false).groups, 2);
        assert_eq!(deployment_kv_cache_usage(&[]), 0.0);
    }

    #[test]
    fn pools_without_a_ceiling_have_no_bounds() {
        let pool = |min, max| PoolSpec {
            min_replicas: min,
            max_replicas: max,
            ..serde_json::from_value(serde_json::json!({"name": "p", "replicas": 1})).unwrap()
        };
        assert_eq!(
            bounds(&[pool(Some(1), Some(3)), pool(None, Some(2))]),
            Some((1, 5))
        );
        assert_eq!(bounds(&[pool(Some(1), Some(3)), pool(None, None)]), None);
    }

    #[test]
    fn a_spec_that_autoscales_a_pool_without_a_ceiling_is_refused_by_name() {
        let sample = include_str!("../../deploy/samples/tiny-autoscaling.yaml");
        let mut dsd: crate::api::DeepSeekDeployment = serde_yaml::from_str(sample).unwrap();
        assert!(dsd.desired().is_ok());
        dsd.spec.pools[0].max_replicas = None;
        let err = dsd.desired().unwrap_err().to_string();
        assert_eq!(
            err,
            "spec.pools[cpu]: maxReplicas is required with spec.autoscaling"
        );
    }
}
