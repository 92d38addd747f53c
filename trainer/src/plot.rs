//! `trainer plot RUN_DIR`: one PNG per metric of metrics.jsonl, step on the x axis.

use crate::metrics::{read_metrics, METRICS_FILE};
use anyhow::{bail, Context, Result};
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// DejaVu Sans (fonts-dejavu-core, free license), so labels render without system fonts.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Series of every numeric metric (not `step` or `time`), as (step, value) points.
pub fn metric_series(path: &Path) -> Result<BTreeMap<String, Vec<(f64, f64)>>> {
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for line in read_metrics(path)? {
        let Some(step) = line["step"].as_f64() else {
            continue;
        };
        for (name, value) in line.as_object().into_iter().flatten() {
            if name == "step" || name == "time" {
                continue;
            }
            if let Some(v) = value.as_f64().filter(|v| v.is_finite()) {
                series.entry(name.clone()).or_default().push((step, v));
            }
        }
    }
    Ok(series)
}

/// Writes `RUN/plots/<metric>.png` for each metric; returns the files written.
pub fn plot_run(run_dir: &Path) -> Result<Vec<PathBuf>> {
    register_font();
    let metrics = run_dir.join(METRICS_FILE);
    let series = metric_series(&metrics)?;
    if series.is_empty() {
        bail!("{} holds no metrics to plot", metrics.display());
    }
    let out_dir = run_dir.join("plots");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let mut written = Vec::new();
    for (name, points) in &series {
        let path = out_dir.join(format!("{name}.png"));
        draw(&path, name, points).with_context(|| format!("cannot draw {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

fn draw(path: &Path, name: &str, points: &[(f64, f64)]) -> Result<()> {
    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let (x_min, x_max) = bounds(points.iter().map(|p| p.0));
    let (y_min, y_max) = bounds(points.iter().map(|p| p.1));
    let mut chart = ChartBuilder::on(&root)
        .caption(name, ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x_min..x_max, y_min..y_max)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc(name)
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 14))
        .draw()?;
    chart.draw_series(LineSeries::new(
        points.iter().copied(),
        BLUE.stroke_width(2),
    ))?;
    if points.len() < 30 {
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, BLUE.filled())))?;
    }
    root.present()?;
    Ok(())
}

/// A range around the values with a margin; a flat or single-point series still gets width.
fn bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let pad = ((hi - lo) * 0.05).max(hi.abs() * 0.05).max(1e-6);
    (lo - pad, hi + pad)
}

/// SkipGPT's routing map: one cell per (layer, module kind) holding the share of tokens that
/// execute it, darker for more; layer 0 at the bottom.
pub fn plot_routing_map(path: &Path, keep: &[[f64; 2]], title: &str) -> Result<()> {
    register_font();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let layers = keep.len().max(1);
    let height = (120 + 40 * layers).min(1600) as u32;
    let root = BitMapBackend::new(path, (560, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(
            // A segmented range `0..n` has n + 1 cells.
            (0..1usize).into_segmented(),
            (0..layers - 1).into_segmented(),
        )?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(2)
        .x_label_formatter(&|x| match x {
            SegmentValue::CenterOf(0) => "attention".into(),
            SegmentValue::CenterOf(1) => "MLP".into(),
            _ => String::new(),
        })
        .y_labels(layers)
        .y_label_formatter(&|y| match y {
            SegmentValue::CenterOf(layer) => layer.to_string(),
            _ => String::new(),
        })
        .y_desc("layer")
        .axis_desc_style(("sans-serif", 16))
        .label_style(("sans-serif", 14))
        .draw()?;
    for (layer, kinds) in keep.iter().enumerate() {
        for (kind, &share) in kinds.iter().enumerate() {
            let shade = (255.0 * (1.0 - share.clamp(0.0, 1.0))) as u8;
            let color = RGBColor(shade, shade, 255);
            chart.draw_series(std::iter::once(Rectangle::new(
                [
                    (SegmentValue::Exact(kind), SegmentValue::Exact(layer)),
                    (
                        SegmentValue::Exact(kind + 1),
                        SegmentValue::Exact(layer + 1),
                    ),
                ],
                color.filled(),
            )))?;
            let text_color = if share > 0.5 { WHITE } else { BLACK };
            chart.draw_series(std::iter::once(Text::new(
                format!("{:.0}%", 100.0 * share),
                (SegmentValue::CenterOf(kind), SegmentValue::CenterOf(layer)),
                ("sans-serif", 15).into_font().color(&text_color),
            )))?;
        }
    }
    root.present()?;
    Ok(())
}

/// A labelled point with a vertical 95% interval, for [`plot_tradeoff`].
pub struct TradeoffPoint {
    pub label: String,
    pub x: f64,
    pub y: f64,
    pub y_interval: (f64, f64),
}

/// Accuracy against length (or any y against x) for several runs: one labelled point each,
/// with its interval as a vertical bar.
pub fn plot_tradeoff(
    path: &Path,
    points: &[TradeoffPoint],
    (x_name, y_name): (&str, &str),
    title: &str,
) -> Result<()> {
    register_font();
    if points.is_empty() {
        bail!("nothing to plot into {}", path.display());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let (x_min, x_max) = bounds(points.iter().map(|p| p.x));
    let (y_min, y_max) = bounds(
        points
            .iter()
            .flat_map(|p| [p.y_interval.0, p.y_interval.1, p.y]),
    );
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(20)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x_min..x_max, y_min..y_max)?;
    chart
        .configure_mesh()
        .x_desc(x_name)
        .y_desc(y_name)
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 14))
        .draw()?;
    chart.draw_series(points.iter().map(|p| {
        PathElement::new(
            vec![(p.x, p.y_interval.0), (p.x, p.y_interval.1)],
            BLUE.stroke_width(2),
        )
    }))?;
    chart.draw_series(
        points
            .iter()
            .map(|p| Circle::new((p.x, p.y), 5, BLUE.filled())),
    )?;
    chart.draw_series(points.iter().map(|p| {
        Text::new(
            p.label.clone(),
            (p.x, p.y),
            ("sans-serif", 14).into_font().color(&BLACK),
        )
    }))?;
    root.present()?;
    Ok(())
}
