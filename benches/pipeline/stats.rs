//! Median and range of a figure over the rounds of a run.

/// The median of some values and their range.
#[derive(Clone, Copy, Debug)]
pub struct Spread {
    /// The median (the mean of the two middle values when their count is even).
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
    /// How many values there were.
    pub count: usize,
}

impl Spread {
    /// The spread of `values`, `None` when there are none.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let mut v: Vec<f64> = values.into_iter().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(Spread { median: median_of_sorted(&v), min: v[0], max: v[v.len() - 1], count: v.len() })
    }

    /// `253 (241–260)`: the median and the range with `digits` decimals; the value alone when
    /// there was one.
    pub fn show(&self, digits: usize) -> String {
        if self.count == 1 {
            format!("{:.digits$}", self.median)
        } else {
            format!("{:.digits$} ({:.digits$}–{:.digits$})", self.median, self.min, self.max)
        }
    }
}

/// The median of `values` (NaN when empty).
pub fn median(values: &[f64]) -> f64 {
    Spread::of(values.iter().copied()).map_or(f64::NAN, |s| s.median)
}

fn median_of_sorted(v: &[f64]) -> f64 {
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}
