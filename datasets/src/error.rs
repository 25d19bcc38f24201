//! The datasets library's typed errors. Each names the file, shard, row or field at fault.

/// Why one sample (a row) cannot be used. Carried in the data report with the sample id.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SampleProblem {
    #[error("column `{column}`: {reason}")]
    Column { column: String, reason: String },
    #[error("{count} references (must be 1 to 6)")]
    RefCount { count: usize },
    #[error("{image}: cannot decode image: {reason}")]
    Image { image: String, reason: String },
    #[error("correspondence {index} names reference {reference}, but the sample has {refs}")]
    UnknownRef {
        index: usize,
        reference: usize,
        refs: usize,
    },
    #[error("correspondence of reference {reference}, point {point}: {field} = {value} is outside [0, 1]")]
    PointOutOfRange {
        reference: usize,
        point: usize,
        field: &'static str,
        value: f32,
    },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    /// The shard or row group holding the row cannot be trusted or decoded.
    #[error("{reason}")]
    Shard { reason: String },
}

impl SampleProblem {
    /// A short stable name for counting problems of one kind in the data report.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Column { .. } => "bad-column",
            Self::RefCount { .. } => "ref-count",
            Self::Image { .. } => "bad-image",
            Self::UnknownRef { .. } => "unknown-ref",
            Self::PointOutOfRange { .. } => "point-out-of-range",
            Self::Invalid { .. } => "invalid",
            Self::Shard { .. } => "bad-shard",
        }
    }
}

/// Any error, as the cause of one of ours.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What went wrong with the data. Each variant says where (`at`: a file, object, shard, line or
/// field); the why is its source (an I/O, object-store or Parquet error, or our own text), so
/// `flux::chain` or anyhow's `{:#}` print "where: why".
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An object store or local file operation failed (after retries).
    #[error("{at}")]
    Store {
        at: String,
        #[source]
        source: BoxError,
    },
    /// A manifest that cannot be used.
    #[error("manifest {at}")]
    Manifest {
        at: String,
        #[source]
        source: BoxError,
    },
    /// A shard (or one of its row groups) that cannot be read.
    #[error("{at}")]
    Shard {
        at: String,
        #[source]
        source: BoxError,
    },
    /// A sample refused in strict mode, or while writing.
    #[error("sample `{sample_id}` ({at}): {problem}")]
    Sample {
        sample_id: String,
        at: String,
        problem: SampleProblem,
    },
    /// A user input (listing file, flag, config value) that is wrong.
    #[error("{at}")]
    Input {
        at: String,
        #[source]
        source: BoxError,
    },
    #[error(transparent)]
    Tokens(#[from] crate::tokens::TokensError),
}

impl DataError {
    /// `why`: a foreign error or our own text.
    pub fn store(at: impl Into<String>, why: impl Into<BoxError>) -> Self {
        Self::Store {
            at: at.into(),
            source: why.into(),
        }
    }

    pub fn input(at: impl Into<String>, why: impl Into<BoxError>) -> Self {
        Self::Input {
            at: at.into(),
            source: why.into(),
        }
    }

    pub fn shard(at: impl Into<String>, why: impl Into<BoxError>) -> Self {
        Self::Shard {
            at: at.into(),
            source: why.into(),
        }
    }

    pub fn manifest(at: impl Into<String>, why: impl Into<BoxError>) -> Self {
        Self::Manifest {
            at: at.into(),
            source: why.into(),
        }
    }

    /// The whole message: where, then why (the error chain).
    pub fn message(&self) -> String {
        flux::chain(self)
    }
}

pub type Result<T> = std::result::Result<T, DataError>;
