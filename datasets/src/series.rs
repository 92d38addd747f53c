//! Time series for forecasting: CSV files in the ETT layout (a `date` column, then one
//! numeric column per channel), a chronological train/validation/test split, scaling fitted
//! on the training part only, and the (input window, horizon) samples of each part.
//!
//! As in the Time-Series-Library code the forecasting papers share: the validation and test
//! parts start `input_length` steps early, so their first window's input is the end of the
//! part before; targets never cross a border, so no target is seen by two parts.

use anyhow::{bail, Context, Result};
use std::ops::Range;
use std::path::Path;

/// A multichannel series: `values[t][c]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub channels: Vec<String>,
    pub values: Vec<Vec<f32>>,
}

impl Series {
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Channel `c` over times `range`.
    pub fn channel(&self, c: usize, range: Range<usize>) -> Vec<f32> {
        self.values[range].iter().map(|row| row[c]).collect()
    }
}

/// Reads a CSV whose first column is the date; `columns` picks channels by name (empty: every
/// other column). Every value must be a finite number: a gap names its line and column.
pub fn load_series_csv(path: &Path, columns: &[String]) -> Result<Series> {
    let (mut reader, headers) = crate::records::open_csv(path)?;
    let picked: Vec<usize> = if columns.is_empty() {
        (1..headers.len()).collect()
    } else {
        columns
            .iter()
            .map(|name| {
                headers.iter().position(|h| h == name).with_context(|| {
                    let names: Vec<&str> = headers.iter().skip(1).collect();
                    format!(
                        "{}: no column `{name}` (columns: {})",
                        path.display(),
                        names.join(", ")
                    )
                })
            })
            .collect::<Result<_>>()?
    };
    if picked.is_empty() {
        bail!("{}: no channel column after the date", path.display());
    }
    let mut values = Vec::new();
    for (index, row) in reader.records().enumerate() {
        let line = index + 2;
        let row = row.map_err(|e| anyhow::anyhow!("{}:{line}: {e}", path.display()))?;
        let parsed: Vec<f32> = picked
            .iter()
            .map(|&c| {
                let text = row.get(c).unwrap_or("").trim();
                match text.parse::<f32>() {
                    Ok(v) if v.is_finite() => Ok(v),
                    _ => bail!(
                        "{}:{line}: column `{}` holds {text:?}, not a number (fill gaps first)",
                        path.display(),
                        &headers[c]
                    ),
                }
            })
            .collect::<Result<_>>()?;
        values.push(parsed);
    }
    Ok(Series {
        channels: picked.iter().map(|&c| headers[c].to_string()).collect(),
        values,
    })
}

/// The time ranges of the three parts (each including the input context before it).
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub train: Range<usize>,
    pub val: Range<usize>,
    pub test: Range<usize>,
}

/// A chronological split by `fractions` (train, validation, test) of a series of `len`
/// steps, for windows of `input_length` inputs.
pub fn chronological_split(len: usize, fractions: [f64; 3], input_length: usize) -> Result<Split> {
    let total: f64 = fractions.iter().sum();
    if fractions.iter().any(|f| *f <= 0.0) || (total - 1.0).abs() > 1e-6 {
        bail!("data.split {fractions:?}: three positive fractions that add up to 1");
    }
    let n_train = (len as f64 * fractions[0]) as usize;
    let n_test = (len as f64 * fractions[2]) as usize;
    let n_val = len - n_train - n_test;
    if n_train < input_length {
        bail!("the training part ({n_train} steps) is shorter than data.input_length ({input_length})");
    }
    Ok(Split {
        train: 0..n_train,
        val: n_train - input_length..n_train + n_val,
        test: len - n_test - input_length..len,
    })
}

/// Start times of every window (input then horizon) inside `range`, `stride` apart.
pub fn window_starts(
    range: Range<usize>,
    input_length: usize,
    horizon: usize,
    stride: usize,
) -> Vec<usize> {
    let span = input_length + horizon;
    if range.len() < span {
        return vec![];
    }
    (range.start..=range.end - span)
        .step_by(stride.max(1))
        .collect()
}

/// Per-channel standardisation, fitted on the training part only.
#[derive(Debug, Clone, PartialEq)]
pub struct Scaler {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

impl Scaler {
    pub fn fit(series: &Series, range: Range<usize>) -> Self {
        let channels = series.channels.len();
        let n = range.len().max(1) as f64;
        let mut mean = vec![0.0f64; channels];
        for row in &series.values[range.clone()] {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += *v as f64 / n;
            }
        }
        let mut var = vec![0.0f64; channels];
        for row in &series.values[range] {
            for ((s, v), m) in var.iter_mut().zip(row).zip(&mean) {
                *s += (*v as f64 - m).powi(2) / n;
            }
        }
        Self {
            mean: mean.iter().map(|&m| m as f32).collect(),
            std: var.iter().map(|&v| (v.sqrt() as f32).max(1e-8)).collect(),
        }
    }

    pub fn transform(&self, series: &Series) -> Series {
        Series {
            channels: series.channels.clone(),
            values: series
                .values
                .iter()
                .map(|row| {
                    row.iter()
                        .enumerate()
                        .map(|(c, v)| (v - self.mean[c]) / self.std[c])
                        .collect()
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_is_chronological_and_targets_never_cross_parts() {
        let (len, input, horizon) = (1000, 48, 24);
        let split = chronological_split(len, [0.7, 0.1, 0.2], input).unwrap();
        assert_eq!(split.train, 0..700);
        assert_eq!(split.val, 652..800);
        assert_eq!(split.test, 752..1000);
        let targets = |range: Range<usize>| -> Vec<Range<usize>> {
            window_starts(range, input, horizon, 1)
                .into_iter()
                .map(|s| s + input..s + input + horizon)
                .collect()
        };
        let (train, val, test) = (
            targets(split.train),
            targets(split.val),
            targets(split.test),
        );
        // Every target time of a part lies in that part's own span: none leaks into another.
        assert!(train.iter().all(|t| t.end <= 700));
        assert!(val.iter().all(|t| t.start >= 700 && t.end <= 800));
        assert!(test.iter().all(|t| t.start >= 800 && t.end <= 1000));
        assert_eq!(
            test.last().unwrap().end,
            1000,
            "the last window reaches the end"
        );
        assert!(chronological_split(100, [0.5, 0.3, 0.3], 10).is_err());
        assert!(chronological_split(100, [0.7, 0.1, 0.2], 80).is_err());
    }

    #[test]
    fn the_scaler_sees_the_training_part_only() {
        let series = Series {
            channels: vec!["x".into()],
            values: (0..10)
                .map(|t| vec![if t < 5 { 1.0 + (t % 2) as f32 } else { 100.0 }])
                .collect(),
        };
        let scaler = Scaler::fit(&series, 0..5);
        assert!((scaler.mean[0] - 1.4).abs() < 1e-6, "{scaler:?}");
        let scaled = scaler.transform(&series);
        assert!(
            scaled.values[9][0] > 100.0,
            "later values are not part of the fit"
        );
    }

    #[test]
    fn csv_channels_and_gaps() {
        let dir = std::env::temp_dir().join(format!("series-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.csv");
        std::fs::write(&path, "date,a,b\n1,1.5,2\n2,2.5,3\n").unwrap();
        let all = load_series_csv(&path, &[]).unwrap();
        assert_eq!(all.channels, ["a", "b"]);
        assert_eq!(all.values, vec![vec![1.5, 2.0], vec![2.5, 3.0]]);
        assert_eq!(
            load_series_csv(&path, &["b".into()]).unwrap().values,
            vec![vec![2.0], vec![3.0]]
        );
        let err = load_series_csv(&path, &["c".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`c`") && err.contains("a, b"), "{err}");
        std::fs::write(&path, "date,a\n1,1.5\n2,\n").unwrap();
        let err = load_series_csv(&path, &[]).unwrap_err().to_string();
        assert!(err.contains("s.csv:3") && err.contains("`a`"), "{err}");
    }
}
