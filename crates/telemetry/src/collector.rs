use prometheus::core::{Collector, Desc};
use prometheus::proto::{Counter, Gauge, LabelPair, Metric, MetricFamily, MetricType};

/// Counter or gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Gauge,
}

type Reader = Box<dyn Fn() -> Vec<(Vec<(String, String)>, f64)> + Send + Sync>;

/// One metric whose value is read when scraped.
pub struct MetricSpec {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: MetricKind,
    read: Reader,
}

impl std::fmt::Debug for MetricSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricSpec").field("name", &self.name).field("kind", &self.kind).finish()
    }
}

impl MetricSpec {
    pub fn counter(name: &'static str, help: &'static str, read: impl Fn() -> f64 + Send + Sync + 'static) -> Self {
        Self { name, help, kind: MetricKind::Counter, read: Box::new(move || vec![(Vec::new(), read())]) }
    }

    pub fn gauge(name: &'static str, help: &'static str, read: impl Fn() -> f64 + Send + Sync + 'static) -> Self {
        Self { name, help, kind: MetricKind::Gauge, read: Box::new(move || vec![(Vec::new(), read())]) }
    }

    /// A metric with labels: `read` returns one `(labels, value)` per series.
    pub fn labelled(
        name: &'static str,
        help: &'static str,
        kind: MetricKind,
        read: impl Fn() -> Vec<(Vec<(String, String)>, f64)> + Send + Sync + 'static,
    ) -> Self {
        Self { name, help, kind, read: Box::new(read) }
    }
}

/// A Prometheus collector over values kept elsewhere (atomics, snapshots).
#[derive(Debug)]
pub struct FnCollector {
    specs: Vec<MetricSpec>,
    descs: Vec<Desc>,
}

impl FnCollector {
    pub fn new(specs: Vec<MetricSpec>) -> Self {
        let descs = specs
            .iter()
            .filter_map(|s| Desc::new(s.name.to_owned(), s.help.to_owned(), Vec::new(), Default::default()).ok())
            .collect();
        Self { specs, descs }
    }
}

impl Collector for FnCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.specs
            .iter()
            .map(|spec| {
                let mut family = MetricFamily::default();
                family.set_name(spec.name.to_owned());
                family.set_help(spec.help.to_owned());
                family.set_field_type(match spec.kind {
                    MetricKind::Counter => MetricType::COUNTER,
                    MetricKind::Gauge => MetricType::GAUGE,
                });
                for (labels, value) in (spec.read)() {
                    let mut metric = Metric::default();
                    metric.set_label(
                        labels
                            .into_iter()
                            .map(|(name, value)| {
                                let mut pair = LabelPair::default();
                                pair.set_name(name);
                                pair.set_value(value);
                                pair
                            })
                            .collect(),
                    );
                    match spec.kind {
                        MetricKind::Counter => {
                            let mut counter = Counter::default();
                            counter.set_value(value);
                            metric.set_counter(counter);
                        }
                        MetricKind::Gauge => {
                            let mut gauge = Gauge::default();
                            gauge.set_value(value);
                            metric.set_gauge(gauge);
                        }
                    }
                    family.mut_metric().push(metric);
                }
                family
            })
            .collect()
    }
}
