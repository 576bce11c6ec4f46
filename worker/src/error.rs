//! The worker's errors. What a request did wrong is not one of them: that is a
//! `validate::InvalidRequest`, returned as INVALID_ARGUMENT.
//!
//! An error's `Display` says all of it, what it wraps included (`Context` prints its context
//! then its cause), so `{err}` is the whole message; the variants that wrap another error
//! in words of their own do not also return it from `source()`, so that nothing prints it
//! twice (the `Caused by:` lines the binary prints).

use std::fmt::Display;

/// The worker's errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `config.json` says something this worker cannot run.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The checkpoint's files are unreadable or inconsistent.
    #[error(transparent)]
    Checkpoint(#[from] crate::weights::LoadError),
    /// The expert-parallel group could not exchange: every request on it fails.
    #[error(transparent)]
    Group(#[from] crate::ep::GroupError),
    /// A tensor operation of the CPU path.
    #[error("tensor: {0}")]
    Tensor(candle_core::Error),
    /// The CUDA driver.
    #[error(transparent)]
    Cuda(#[from] cudarc::driver::DriverError),
    /// cuBLAS.
    #[error(transparent)]
    Cublas(#[from] cudarc::cublas::result::CublasError),
    /// A symbol missing from a library loaded at run time (NVRTC).
    #[error(transparent)]
    Library(#[from] libloading::Error),
    /// The gRPC server.
    #[error(transparent)]
    Grpc(#[from] tonic::transport::Error),
    /// gRPC reflection's descriptors.
    #[error(transparent)]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// Anything else, said in words: a flag, a file or a pass that cannot be used.
    #[error("{0}")]
    Message(String),
    /// An error and what was being done when it happened. (`error`, not `source`: a field
    /// named `source` would be `source()` too, and its text would print twice.)
    #[error("{context}: {error}")]
    Context { context: String, error: Box<Error> },
}

/// A result whose error is the worker's.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error said in words.
    pub fn msg(message: impl Display) -> Self {
        Error::Message(message.to_string())
    }

    /// Whether this error (or one it wraps in `Context`) is a group failure.
    pub fn is_group(&self) -> bool {
        match self {
            Error::Group(_) => true,
            Error::Context { error, .. } => error.is_group(),
            _ => false,
        }
    }
}

impl From<candle_core::Error> for Error {
    /// Not `#[from]`: that would make the tensor error the source too, and its text would
    /// print twice.
    fn from(err: candle_core::Error) -> Self {
        Error::Tensor(err)
    }
}

/// What was being done when an error happened: `.context(…)` on a `Result` or an `Option`.
pub trait Context<T> {
    /// Wraps the error (or a `None`) in `context`.
    fn context<C: Display>(self, context: C) -> Result<T>;
    /// Wraps the error (or a `None`) in the context `f` gives, made only on failure.
    fn with_context<C: Display, F: FnOnce() -> C>(self, f: F) -> Result<T>;
}

impl<T, E: Into<Error>> Context<T> for std::result::Result<T, E> {
    fn context<C: Display>(self, context: C) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: context.to_string(),
            error: Box::new(e.into()),
        })
    }

    fn with_context<C: Display, F: FnOnce() -> C>(self, f: F) -> Result<T> {
        self.map_err(|e| Error::Context {
            context: f().to_string(),
            error: Box::new(e.into()),
        })
    }
}

impl<T> Context<T> for Option<T> {
    fn context<C: Display>(self, context: C) -> Result<T> {
        self.ok_or_else(|| Error::Message(context.to_string()))
    }

    fn with_context<C: Display, F: FnOnce() -> C>(self, f: F) -> Result<T> {
        self.ok_or_else(|| Error::Message(f().to_string()))
    }
}

/// Returns early with an [`Error::Message`](crate::error::Error::Message) made as `format!`
/// makes a string.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)+) => {
        return ::std::result::Result::Err($crate::error::Error::Message(::std::format!($($arg)+)))
    };
}

/// Returns early with an [`Error::Message`](crate::error::Error::Message) made as `format!`
/// makes a string, unless `cond` holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {{
        // Through a binding: `!(a >= b)` is meant (NaN fails the check), and clippy would
        // take the negated comparison for a mistake.
        let holds: bool = $cond;
        if !holds {
            $crate::bail!($($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ep::GroupError;

    #[test]
    fn context_prints_its_cause_once_and_keeps_a_group_failure_a_group_failure() {
        let io: Result<()> = Err(std::io::Error::other("refused").into());
        let err = io.context("rank 1").context("joining").unwrap_err();
        assert_eq!(err.to_string(), "joining: rank 1: refused");
        assert!(std::error::Error::source(&err).is_none());
        assert!(!err.is_group());

        let group: Result<()> = Err(GroupError("rank 1 went away".into()).into());
        let err = group.with_context(|| "layer 3").unwrap_err();
        assert_eq!(
            err.to_string(),
            "layer 3: expert-parallel group: rank 1 went away"
        );
        assert!(err.is_group());
        assert_eq!(
            None::<u32>.context("no port").unwrap_err().to_string(),
            "no port"
        );
    }

    #[test]
    fn bail_and_ensure_say_it_in_words() {
        fn check(n: usize) -> Result<usize> {
            ensure!(n > 0, "n must be positive, got {n}");
            if n > 9 {
                bail!("n={n} is too large");
            }
            Ok(n)
        }
        assert_eq!(check(3).unwrap(), 3);
        assert_eq!(
            check(0).unwrap_err().to_string(),
            "n must be positive, got 0"
        );
        assert_eq!(check(10).unwrap_err().to_string(), "n=10 is too large");
    }
}
