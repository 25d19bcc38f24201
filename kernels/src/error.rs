//! Typed errors of the kernels crate: every bad argument names itself.

/// Errors raised by the loss and row ops.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// An argument has a shape the op cannot take.
    #[error("{op}: argument `{arg}` has shape {found:?}, expected {expected}")]
    Shape {
        op: &'static str,
        arg: &'static str,
        expected: String,
        found: Vec<usize>,
    },
    /// An index argument points outside the tensor it indexes.
    #[error("{op}: argument `{arg}` holds index {index} at position {position}, but the bound is {bound}")]
    IndexOutOfRange {
        op: &'static str,
        arg: &'static str,
        index: usize,
        position: usize,
        bound: usize,
    },
    /// Two arguments that must agree in length do not.
    #[error("{op}: `{arg}` has length {found}, but {expected_from} implies {expected}")]
    Length {
        op: &'static str,
        arg: &'static str,
        found: usize,
        expected: usize,
        expected_from: &'static str,
    },
    /// A correspondence names a reference token the reference does not have.
    #[error("{op}: pair {position} of reference {reference} names reference token {token}, but the reference has {tokens} tokens")]
    PointOutOfRange {
        op: &'static str,
        reference: usize,
        position: usize,
        token: usize,
        tokens: usize,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, KernelError>;
