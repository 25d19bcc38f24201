//! Autograd against central finite differences for every LoRA tensor, and block-wise
//! recomputation against the plain backward. A no-backward op anywhere in the graph, or a
//! wrong recomputation, fails here.

use flux::lora::adaptable_modules;
use trainer::data::Sample;
use trainer::objective::{self, DrawAt, Prepared};
use trainer::run::Run;

use crate::common::{max_abs, max_abs_diff, randn_like, randomize_lora_b, tiny_config};

/// `base`'s config changed by `change`, built in `dir`, with the same LoRA B.
fn variant(
    base: &Run,
    dir: &std::path::Path,
    change: impl FnOnce(&mut trainer::config::Config),
) -> Run {
    let mut cfg = base.cfg.clone();
    change(&mut cfg);
    cfg.run.dir = dir.display().to_string();
    let run = Run::build(cfg).unwrap();
    randomize_lora_b(&run.lora, 11);
    run
}

/// Every module of the reference branch adapted, two references per sample (so MDL is active),
/// batch of two, both losses on, rows from a double and a single block.
fn gradient_run(dtype: &str, dir: &std::path::Path) -> Run {
    let fc = flux::FluxConfig::tiny();
    let all: Vec<String> = adaptable_modules(&fc)
        .into_iter()
        .map(|(m, _, _)| format!("{m:?}"))
        .collect();
    let targets = format!("lora.targets=[{}]", all.join(","));
    let cfg = tiny_config(
        dir,
        &[
            &format!("model.dtype=\"{dtype}\""),
            &targets,
            "data.min_refs=2",
            "data.max_refs=2",
            "data.samples=4",
            "data.resolution=64",
            "data.ref_resolution=64",
            "loss.points_per_ref=8",
            "loss.double_blocks=[1]",
            "loss.single_blocks=[0]",
            "loss.scal_weight=0.4",
            "loss.mdl_weight=0.6",
            // Chunked attention (the default) with a chunk that divides no stream length nor S.
            "model.attention_chunk=7",
        ],
    );
    let run = Run::build(cfg).unwrap();
    randomize_lora_b(&run.lora, 11);
    run
}

fn prepared(run: &Run) -> Prepared {
    let data = run.data.in_memory().unwrap();
    let samples: Vec<&Sample> = vec![&data[0], &data[1]];
    objective::prepare(
        &run.objective(),
        &samples,
        DrawAt {
            seed: 5,
            step: 3,
            first_slot: 0,
        },
        true,
        run.model.dtype(),
        &run.device,
    )
    .unwrap()
}

#[test]
fn finite_differences_match_autograd_for_every_lora_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let run = gradient_run("f64", tmp.path());
    assert_eq!(run.cfg.loss.recipe(), objective::Recipe::Paper);
    check_finite_differences(&run);
}

/// The official recipe: every pair, pooled SCAL, JSD of the mean rows of all reference tokens,
/// with condition dropout on and the dropped samples still supervised.
fn official(c: &mut trainer::config::Config) {
    c.loss.points_per_ref = 0;
    c.loss.scal_reduce = objective::ScalReduceName::Pooled;
    c.loss.mdl_rows = objective::MdlRows::AllTokens;
    c.loss.mdl_divergence = objective::DivergenceName::Jsd;
    c.loss.supervise_dropped_refs = true;
}

#[test]
fn finite_differences_match_autograd_under_the_official_recipe() {
    let tmp = tempfile::tempdir().unwrap();
    let paper = gradient_run("f64", &tmp.path().join("paper"));
    let run = variant(&paper, &tmp.path().join("official"), official);
    assert_eq!(run.cfg.loss.recipe(), objective::Recipe::Official);
    check_finite_differences(&run);
}

#[test]
fn all_token_rows_hold_the_pairs_rows() {
    // SCAL read from the all-token rows (picked by index) equals SCAL on rows queried at the
    // pairs directly; MDL's rows are every reference token.
    let tmp = tempfile::tempdir().unwrap();
    let paper = gradient_run("f64", &tmp.path().join("paper"));
    let all = variant(&paper, &tmp.path().join("all"), official);
    let points = variant(&paper, &tmp.path().join("points"), |c| {
        official(c);
        c.loss.mdl_rows = objective::MdlRows::Points;
    });
    let (pa, pp) = (prepared(&all), prepared(&points));
    let data = all.data.in_memory().unwrap();
    let queries = pa.inputs.row_queries.as_ref().unwrap();
    for (b, q) in queries.iter().enumerate() {
        let tokens: usize = data[b].refs.iter().map(|r| r.grid.len()).sum();
        assert_eq!(q, &(0..tokens as u32).collect::<Vec<_>>());
        let t = pa.row_targets[b].as_ref().unwrap();
        let pairs: usize = data[b].refs.iter().map(|r| r.pairs.len()).sum();
        assert_eq!(t.scal_tgt.len(), pairs, "points_per_ref = 0: every pair");
        let lens: Vec<usize> = data[b].refs.iter().map(|r| r.grid.len()).collect();
        assert_eq!(t.mdl_segments.0, lens);
    }
    let go = |r: &Run, p: &Prepared| {
        objective::loss_and_lora_grads(&r.model, &r.lora, p, &r.objective(), 0, false)
            .unwrap()
            .0
    };
    let (a, p) = (go(&all, &pa), go(&points, &pp));
    assert!(
        (a.scal - p.scal).abs() < 1e-12 * a.scal.abs(),
        "{a:?} vs {p:?}"
    );
    assert!((a.diff - p.diff).abs() < 1e-12, "{a:?} vs {p:?}");
    assert!(
        (a.mdl - p.mdl).abs() > 1e-6,
        "all-token and point MDL differ: {a:?} vs {p:?}"
    );
}

#[test]
fn dropped_references_are_zeroed_and_left_out_of_the_row_losses() {
    let tmp = tempfile::tempdir().unwrap();
    let paper = gradient_run("f64", &tmp.path().join("paper"));
    let dropped = variant(&paper, &tmp.path().join("dropped"), |c| {
        c.data.drop_both = 1.0;
    });
    let prep = prepared(&dropped);
    assert!(prep.dropped.iter().all(|d| d.refs && d.text));
    let refs = prep.inputs.refs.as_ref().unwrap();
    assert_eq!(max_abs(&refs.latents), 0.0, "reference latents zeroed");
    let empty = dropped.data.empty_caption().unwrap();
    assert_eq!(
        max_abs_diff(&prep.inputs.txt.get(0).unwrap(), &empty.txt),
        0.0
    );
    assert_eq!(
        max_abs_diff(&prep.inputs.pooled.get(1).unwrap(), &empty.pooled),
        0.0
    );
    assert!(prep.row_targets.iter().all(Option::is_none));
    let (parts, _) = objective::loss_and_lora_grads(
        &dropped.model,
        &dropped.lora,
        &prep,
        &dropped.objective(),
        0,
        false,
    )
    .unwrap();
    assert_eq!((parts.scal, parts.mdl), (0.0, 0.0), "{parts:?}");
    // The official behaviour supervises them anyway.
    let supervised = variant(&paper, &tmp.path().join("supervised"), |c| {
        c.data.drop_both = 1.0;
        c.loss.supervise_dropped_refs = true;
    });
    let prep = prepared(&supervised);
    assert!(prep.row_targets.iter().all(Option::is_some));
    let (parts, _) = objective::loss_and_lora_grads(
        &supervised.model,
        &supervised.lora,
        &prep,
        &supervised.objective(),
        0,
        false,
    )
    .unwrap();
    assert!(parts.scal > 0.0, "{parts:?}");
}

/// Central finite differences along one random direction per LoRA tensor against autograd.
fn check_finite_differences(run: &Run) {
    let prep = prepared(run);
    let loss = |r: &Run| {
        objective::loss_and_lora_grads(&r.model, &r.lora, &prep, &r.objective(), 0, false).unwrap()
    };
    let (parts, grads) = loss(run);
    assert!(
        parts.scal > 0.0 && parts.mdl < 0.0,
        "both row losses must be active: {parts:?}"
    );
    let named = run.lora.named_vars();
    assert_eq!(named.len(), 2 * adaptable_modules(&run.model.cfg).len());
    // Reference outputs of the last block are discarded, so there the reference branch's query,
    // MLP and output projection reach nothing (its keys and values still feed the target).
    let last = format!(
        "single_transformer_blocks.{}.",
        run.model.cfg.num_single - 1
    );
    let structurally_zero = |name: &str| {
        name.strip_prefix(&last).is_some_and(|rest| {
            ["attn.to_q.", "proj_mlp.", "proj_out."]
                .iter()
                .any(|m| rest.starts_with(m))
        })
    };
    let eps = 1e-5;
    let mut failures = Vec::new();
    for (i, (name, var)) in named.iter().enumerate() {
        let w = var.as_tensor().copy().unwrap();
        // One random direction per tensor checks all of its elements at once.
        let d = randn_like(&w, 1.0, 100 + i as u64);
        var.set(&(&w + (&d * eps).unwrap()).unwrap()).unwrap();
        let plus = loss(run).0.total;
        var.set(&(&w - (&d * eps).unwrap()).unwrap()).unwrap();
        let minus = loss(run).0.total;
        var.set(&w).unwrap();
        let fd = (plus - minus) / (2.0 * eps);
        let analytic = (&grads[i].to_dtype(candle_core::DType::F64).unwrap()
            * &d.to_dtype(candle_core::DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let tol = 1e-6 * analytic.abs().max(1e-3);
        if structurally_zero(name) {
            if analytic != 0.0 || fd.abs() > 1e-9 {
                failures.push(format!(
                    "{name}: expected no gradient, got autograd {analytic}, finite difference {fd}"
                ));
            }
        } else if analytic.abs() <= 1e-9 {
            failures.push(format!("{name}: gradient is zero, so no signal reaches it"));
        } else if (fd - analytic).abs() > tol {
            failures.push(format!(
                "{name}: finite difference {fd} vs autograd {analytic} (rel {:.1e})",
                (fd - analytic).abs() / analytic.abs()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} tensors fail:\n{}",
        failures.len(),
        named.len(),
        failures.join("\n")
    );
}

#[test]
fn checkpointing_gives_equal_gradients() {
    for dtype in ["f64", "f32"] {
        let tmp = tempfile::tempdir().unwrap();
        let run = gradient_run(dtype, tmp.path());
        let prep = prepared(&run);
        let (plain_parts, plain) = objective::loss_and_lora_grads(
            &run.model,
            &run.lora,
            &prep,
            &run.objective(),
            0,
            false,
        )
        .unwrap();
        let (ckpt_parts, ckpt) =
            objective::loss_and_lora_grads(&run.model, &run.lora, &prep, &run.objective(), 0, true)
                .unwrap();
        assert_eq!(
            plain_parts, ckpt_parts,
            "{dtype}: the recomputed forward must give the same losses"
        );
        let tol = if dtype == "f64" { 1e-12 } else { 1e-5 };
        for (i, (a, b)) in plain.iter().zip(&ckpt).enumerate() {
            let scale = max_abs(a).max(1e-3);
            let err = max_abs_diff(a, b);
            assert!(
                err <= tol * scale,
                "{dtype}: tensor {} differs by {err} (scale {scale})",
                run.lora.named_vars()[i].0
            );
        }
    }
}

#[test]
fn fused_rows_give_the_plain_composition_s_losses_and_gradients() {
    let tmp = tempfile::tempdir().unwrap();
    let fused = gradient_run("f64", &tmp.path().join("fused"));
    let plain = variant(&fused, &tmp.path().join("plain"), |c| {
        c.loss.rows = trainer::objective::RowsImpl::Plain;
    });
    assert_same_losses_and_gradients(&fused, &plain);
}

#[test]
fn chunked_attention_gives_full_attention_s_losses_and_gradients() {
    let tmp = tempfile::tempdir().unwrap();
    let chunked = gradient_run("f64", &tmp.path().join("chunked"));
    let full = variant(&chunked, &tmp.path().join("full"), |c| {
        c.model.attention = trainer::config::AttentionName::Full;
    });
    assert_same_losses_and_gradients(&chunked, &full);
}

/// Losses to 1e-12 and every LoRA gradient to 1e-9 (relative) on one prepared batch.
fn assert_same_losses_and_gradients(a: &Run, b: &Run) {
    let prep = prepared(a);
    let go = |r: &Run| {
        objective::loss_and_lora_grads(&r.model, &r.lora, &prep, &r.objective(), 0, false).unwrap()
    };
    let ((pa, ga), (pb, gb)) = (go(a), go(b));
    for (x, y) in [
        (pa.diff, pb.diff),
        (pa.scal, pb.scal),
        (pa.mdl, pb.mdl),
        (pa.total, pb.total),
    ] {
        assert!((x - y).abs() < 1e-12 * x.abs().max(1.0), "{pa:?} vs {pb:?}");
    }
    let worst = ga
        .iter()
        .zip(&gb)
        .map(|(x, y)| max_abs_diff(x, y) / max_abs(y).max(1e-12))
        .fold(0f64, f64::max);
    assert!(worst < 1e-9, "gradients differ by {worst} (relative)");
}
