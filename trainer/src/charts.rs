//! `trainer plot`: one PNG of a run's curves from its `metrics.jsonl`: total loss, L_diff,
//! SCAL, MDL, learning rate, gradient norm and seconds per step against the step, each raw
//! (faint) and smoothed (TensorBoard's debiased exponential moving average, weight 0.9).
//! Drawn with plotters into an RGB buffer; text uses the bundled DejaVu Sans
//! (`trainer/assets`, its licence beside it), so no system font is needed.

use std::path::Path;
use std::sync::Once;

use image::RgbImage;
use plotters::prelude::*;

use crate::error::{Result, TrainerError};

/// The curves, in panel order: (metrics.jsonl key, title).
pub const SERIES: [(&str, &str); 7] = [
    ("loss", "total loss"),
    ("loss_diff", "L_diff (flow matching)"),
    ("loss_scal", "SCAL"),
    ("loss_mdl", "MDL"),
    ("lr", "learning rate"),
    ("grad_norm", "gradient norm"),
    ("s_per_step", "seconds per step"),
];

/// Smoothing weight of the bold line.
pub const SMOOTHING: f64 = 0.9;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const WIDTH: u32 = 1200;
const PANEL_HEIGHT: u32 = 300;

/// One curve: (step, value) of every step line with a finite value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// The debiased exponential moving average of the values (TensorBoard's smoothing).
    pub fn smoothed(&self, weight: f64) -> Vec<(f64, f64)> {
        let mut last = 0.0;
        self.points
            .iter()
            .enumerate()
            .map(|(i, &(x, y))| {
                last = last * weight + (1.0 - weight) * y;
                let debias = 1.0 - weight.powi(i as i32 + 1);
                (x, last / debias)
            })
            .collect()
    }
}

/// Every series of `SERIES` from the text of a metrics.jsonl (lines without `loss`, such as
/// validation lines, are skipped; a line that is not JSON is named by its number).
pub fn read_series(text: &str, path: &Path) -> Result<Vec<Series>> {
    let mut out = vec![Series::default(); SERIES.len()];
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| TrainerError::Parse {
            file: path.to_path_buf(),
            reason: format!("line {}: {e}", n + 1),
        })?;
        let (Some(step), true) = (
            v.get("step").and_then(|s| s.as_f64()),
            v.get("loss").is_some(),
        ) else {
            continue;
        };
        for (s, (key, _)) in out.iter_mut().zip(SERIES) {
            if let Some(y) = v
                .get(key)
                .and_then(|y| y.as_f64())
                .filter(|y| y.is_finite())
            {
                s.points.push((step, y));
            }
        }
    }
    Ok(out)
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The bundled font is a valid TTF; if registering failed, text would be missing.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn draw_err(e: impl std::fmt::Display) -> TrainerError {
    TrainerError::Input {
        name: "chart".into(),
        reason: e.to_string(),
    }
}

/// The chart of `series` (in `SERIES` order) under `title`: two columns of panels.
pub fn render(series: &[Series], title: &str) -> Result<RgbImage> {
    register_font();
    let rows = SERIES.len().div_ceil(2) as u32;
    let height = 50 + rows * PANEL_HEIGHT;
    let mut buf = vec![255u8; (WIDTH * height * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let root = root.titled(title, ("sans-serif", 24)).map_err(draw_err)?;
        let panels = root.split_evenly((rows as usize, 2));
        for ((panel, s), (_, name)) in panels.iter().zip(series).zip(SERIES) {
            draw_panel(panel, s, name)?;
        }
        root.present().map_err(draw_err)?;
    }
    RgbImage::from_raw(WIDTH, height, buf).ok_or_else(|| draw_err("buffer size"))
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    s: &Series,
    name: &str,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let (x0, x1) = match (s.points.first(), s.points.last()) {
        (Some(a), Some(b)) => (a.0, b.0.max(a.0 + 1.0)),
        _ => (0.0, 1.0),
    };
    let (mut y0, mut y1) = s
        .points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
            (lo.min(p.1), hi.max(p.1))
        });
    if !(y0.is_finite() && y1.is_finite()) {
        (y0, y1) = (0.0, 1.0);
    }
    // A flat curve (a loss that is off) gets a readable range around its value.
    let spread = y1 - y0;
    let pad = if spread > 1e-9 * y1.abs().max(y0.abs()).max(1e-12) {
        spread * 0.05
    } else {
        y1.abs().max(1.0) * 0.5
    };
    let mut chart = ChartBuilder::on(area)
        .caption(name, ("sans-serif", 18))
        .margin(8)
        .margin_right(24)
        .x_label_area_size(28)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE.mix(0.0))
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| short(*y))
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(draw_err)?;
    let colour = RGBColor(31, 119, 180);
    chart
        .draw_series(LineSeries::new(s.points.iter().copied(), colour.mix(0.25)))
        .map_err(draw_err)?;
    chart
        .draw_series(LineSeries::new(
            s.smoothed(SMOOTHING),
            colour.stroke_width(2),
        ))
        .map_err(draw_err)?;
    Ok(())
}

/// A compact axis label: plain for ordinary magnitudes, scientific otherwise.
fn short(y: f64) -> String {
    let a = y.abs();
    if a < 1e-12 {
        "0".into()
    } else if (1e-2..1e4).contains(&a) {
        format!("{y:.3}")
    } else {
        format!("{y:.1e}")
    }
}

/// Reads `run_dir/metrics.jsonl` and writes its chart to `out`.
pub fn plot_run(run_dir: &Path, out: &Path) -> Result<()> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| TrainerError::io(&path, e))?;
    let series = read_series(&text, &path)?;
    if series[0].points.is_empty() {
        return Err(TrainerError::Input {
            name: path.display().to_string(),
            reason: "holds no step line yet".into(),
        });
    }
    let title = format!(
        "{} (raw faint, smoothed {SMOOTHING})",
        run_dir.file_name().map_or_else(
            || run_dir.display().to_string(),
            |n| n.to_string_lossy().into()
        )
    );
    let img = render(&series, &title)?;
    img.save_with_format(out, image::ImageFormat::Png)
        .map_err(|e| TrainerError::read(out, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothing_is_tensorboard_s_debiased_average() {
        let s = Series {
            points: vec![(1.0, 1.0), (2.0, 3.0), (3.0, 2.0)],
        };
        let sm = s.smoothed(0.5);
        // EMA with zero start, divided by 1 - w^(i+1).
        let want = [1.0, (0.5 * 0.5 + 0.5 * 3.0) / 0.75, 0.0];
        assert!((sm[0].1 - want[0]).abs() < 1e-12);
        assert!((sm[1].1 - want[1]).abs() < 1e-12);
        let e3 = ((0.5 * 0.5 + 1.5) * 0.5 + 0.5 * 2.0) / 0.875;
        assert!((sm[2].1 - e3).abs() < 1e-12);
        // A constant stays constant.
        let flat = Series {
            points: (0..5).map(|i| (i as f64, 4.0)).collect(),
        };
        assert!(flat.smoothed(0.9).iter().all(|p| (p.1 - 4.0).abs() < 1e-12));
    }

    #[test]
    fn step_lines_are_read_and_other_lines_skipped() {
        let text = concat!(
            r#"{"step":1,"loss":2.0,"loss_diff":1.5,"loss_scal":0.4,"loss_mdl":0.1,"grad_norm":1.0,"lr":0.001,"s_per_step":0.5}"#,
            "\n",
            r#"{"step":1,"validation":{"grid":"g.png"}}"#,
            "\n",
            r#"{"step":2,"loss":1.0,"loss_diff":1.0,"loss_scal":0.0,"loss_mdl":0.0,"grad_norm":null,"lr":0.001,"s_per_step":0.5}"#,
            "\n"
        );
        let s = read_series(text, Path::new("m.jsonl")).unwrap();
        assert_eq!(s[0].points, vec![(1.0, 2.0), (2.0, 1.0)]);
        assert_eq!(
            s[5].points,
            vec![(1.0, 1.0)],
            "a null grad norm is left out"
        );
        let e = read_series("{oops\n", Path::new("m.jsonl")).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn the_chart_has_curves_in_every_panel() {
        let text: String = (1..=50)
            .map(|i| {
                format!(
                    "{{\"step\":{i},\"loss\":{},\"loss_diff\":1.0,\"loss_scal\":0.5,\"loss_mdl\":-0.1,\"grad_norm\":2.0,\"lr\":0.0001,\"s_per_step\":0.3}}\n",
                    1.0 / i as f64
                )
            })
            .collect();
        let s = read_series(&text, Path::new("m.jsonl")).unwrap();
        let img = render(&s, "test").unwrap();
        assert_eq!(img.width(), WIDTH);
        // The curve colour appears (the smoothed line is drawn solid).
        let blue = img.pixels().filter(|p| p.0 == [31, 119, 180]).count();
        assert!(blue > 500, "{blue} curve pixels");
        // Text was drawn (dark pixels beyond the axes' lines).
        let dark = img
            .pixels()
            .filter(|p| p.0[0] < 80 && p.0[1] < 80 && p.0[2] < 80)
            .count();
        assert!(dark > 2000, "{dark} dark pixels");
    }
}
