//! Metrics pooled over examples: every metric is kept as (sum, count) so that gradient
//! accumulation and logging intervals pool over all examples of the interval, as TRL does.
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MetricSums {
    sums: BTreeMap<String, (f64, f64)>,
}

impl MetricSums {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `sum` over `count` items to metric `name`.
    pub fn add(&mut self, name: &str, sum: f64, count: f64) {
        let e = self.sums.entry(name.to_string()).or_insert((0.0, 0.0));
        e.0 += sum;
        e.1 += count;
    }

    /// Adds a single observation with weight 1.
    pub fn add_value(&mut self, name: &str, value: f64) {
        self.add(name, value, 1.0);
    }

    pub fn merge(&mut self, other: &MetricSums) {
        for (k, (s, c)) in &other.sums {
            self.add(k, *s, *c);
        }
    }

    /// Mean of one metric, None when it was never observed (or only with count 0).
    pub fn mean(&self, name: &str) -> Option<f64> {
        self.sums
            .get(name)
            .and_then(|(s, c)| if *c > 0.0 { Some(s / c) } else { None })
    }

    /// All metric means, in name order; metrics with count 0 are left out.
    pub fn means(&self) -> BTreeMap<String, f64> {
        self.sums
            .iter()
            .filter(|(_, (_, c))| *c > 0.0)
            .map(|(k, (s, c))| (k.clone(), s / c))
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.sums.is_empty()
    }

    pub fn clear(&mut self) {
        self.sums.clear();
    }
}
