//! The placement ConfigMap: which experts each rank of a pool's groups holds.

use std::collections::BTreeMap;

use deepseek_proto::placement::{PLAN_FILE, PlacementPlan};
use k8s_openapi::api::core::v1::ConfigMap;

use super::{Ctx, ExpertLoad};
use crate::names::placement_name;
use crate::resolve::ResolvedPool;

impl Ctx<'_> {
    /// The pool's plan, balanced by `load` where there is any, as the ConfigMap holds it.
    pub(super) fn placement_plan_json(&self, pool: &ResolvedPool, load: &ExpertLoad) -> String {
        let plan = PlacementPlan::balanced(
            pool.group_size as u32,
            pool.routed_experts,
            self.dsd.spec.parallelism.redundant_experts.max(0) as u32,
            load,
        );
        serde_json::to_string(&plan).expect("plan serialises")
    }

    pub(super) fn placement_config_map(&self, pool: &ResolvedPool, plan_json: String) -> ConfigMap {
        ConfigMap {
            metadata: self.meta(
                placement_name(&self.name, &pool.name),
                self.pool_labels(pool),
            ),
            data: Some(BTreeMap::from([(PLAN_FILE.to_string(), plan_json)])),
            ..Default::default()
        }
    }
}
