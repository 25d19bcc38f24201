//! Range predicates the config sections' `validate` share.

/// v > 0; false for NaN, so a NaN in the config is refused.
pub(crate) fn positive(v: f64) -> bool {
    v > 0.0
}

/// v >= 0; false for NaN.
pub(crate) fn non_negative(v: f64) -> bool {
    v >= 0.0
}
