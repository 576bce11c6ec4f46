//! The autoscaler's decision (pure): from the load the workers reported over time, how many
//! groups a deployment runs. The pools share that total as they share `spec.replicas`
//! (`resolve::pool_replicas`): each its minimum, then in order up to its maximum, so the
//! first pool fills first and the next takes the spill-over; scaling down empties them in
//! reverse.

use crate::api::{AutoscalingSpec, PoolSpec};

/// The deployment's load at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Seconds since any fixed start.
    pub at: f64,
    /// Requests running and waiting on all its workers.
    pub requests: u64,
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

/// Groups `requests` call for at `target` requests a group.
fn called_for(requests: u64, target: i32) -> i32 {
    let target = u64::try_from(target.max(1)).unwrap_or(1);
    i32::try_from(requests.div_ceil(target)).unwrap_or(i32::MAX)
}

/// The groups to run now, `current` running, given the samples up to `now` (oldest first).
/// Up: to the fewest groups the load called for at every sample of the scale-up window.
/// Down: to the most it called for during the scale-down window, once the history covers
/// that window. Never below one group: waking from zero on a request is not built yet.
pub fn decide(
    spec: &AutoscalingSpec,
    (min, max): (i32, i32),
    current: i32,
    history: &[Sample],
    now: f64,
) -> Decision {
    let floor = min.max(1);
    let clamp = |groups: i32| groups.clamp(floor, max.max(floor));
    let called = |window: i32| {
        history
            .iter()
            .filter(move |s| s.at >= now - f64::from(window))
            .map(|s| called_for(s.requests, spec.target_requests_per_group))
    };
    let up = called(spec.scale_up_window_seconds).min().map(clamp);
    let covers_down_window = history
        .first()
        .is_some_and(|s| s.at <= now - f64::from(spec.scale_down_window_seconds));
    let down = called(spec.scale_down_window_seconds)
        .max()
        .filter(|_| covers_down_window)
        .map(clamp);
    let requests = history.last().map_or(0, |s| s.requests);
    let per_group = spec.target_requests_per_group;
    match (up, down) {
        (Some(up), _) if up > current => Decision {
            groups: up,
            reason: format!(
                "{requests} requests at {per_group} a group call for {up} (for {} s)",
                spec.scale_up_window_seconds
            ),
        },
        (_, Some(down)) if down < current => Decision {
            groups: down,
            reason: format!(
                "at most {down} groups called for during the last {} s",
                spec.scale_down_window_seconds
            ),
        },
        _ if clamp(current) != current => Decision {
            groups: clamp(current),
            reason: format!("kept within the pools' {floor}..{max} groups"),
        },
        _ => Decision {
            groups: current,
            reason: format!("{requests} requests at {per_group} a group"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(up: i32, down: i32) -> AutoscalingSpec {
        AutoscalingSpec {
            target_requests_per_group: 10,
            scale_up_window_seconds: up,
            scale_down_window_seconds: down,
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
                history.push(Sample { at: now, requests });
                groups = decide(spec, bounds, groups, &history, now).groups;
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
        let at = |requests| [Sample { at: 0.0, requests }];
        assert_eq!(decide(&spec, (2, 3), 5, &at(50), 0.0).groups, 3);
        assert_eq!(decide(&spec, (2, 3), 1, &at(50), 0.0).groups, 3);
        assert_eq!(decide(&spec, (2, 3), 3, &at(0), 0.0).groups, 2);
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
