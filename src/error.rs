//! Typed errors of the I/O layers: the Hub, checkpoint files, images and configurations.
//!
//! The crate's functions return [`candle_core::Result`], so that `?` mixes them freely with
//! Candle's own calls. The failures a caller may want to handle differently (offline and not
//! cached, not on the Hub, unauthorised, an integrity failure, a truncated checkpoint, a missing
//! tensor, an image over the pixel limit, ...) are raised as an [`Error`] inside the
//! `candle_core::Error`; [`Error::find`] gets it back, whatever wrappers Candle added on the way
//! (backtrace, context, path):
//!
//! ```
//! use candle_core::{DType, Device};
//! use internimage::{Config, InternImage};
//!
//! let err = InternImage::from_checkpoint(&Config::t(), "no-such-file.pth", DType::F32, &Device::Cpu)
//!     .unwrap_err();
//! match internimage::Error::find(&err) {
//!     Some(internimage::Error::Io { path, .. }) => assert!(path.ends_with("no-such-file.pth")),
//!     Some(other) => panic!("another failure: {other}"),
//!     None => panic!("not an I/O-layer error: {err}"),
//! }
//! // What to show a user: the message, never a backtrace.
//! assert!(internimage::error::user_message(&err).starts_with("cannot open checkpoint"));
//! ```
//!
//! How it travels: candle-core 0.11's only wrapper that keeps a typed error reachable and prints
//! it unchanged is `candle_core::Error::Io`, so an [`Error`] becomes
//! `candle_core::Error::Io(std::io::Error::new(kind, error))` (the `io::ErrorKind` follows the
//! variant: `NotFound`, `PermissionDenied`, `InvalidData`, `UnexpectedEof`, `InvalidInput`, ...).
//! Its `Display` is the message alone: no backtrace is attached, even with `RUST_BACKTRACE=1`.

use std::path::PathBuf;

/// A failure of the I/O layers (Hub, checkpoint files, images, configurations) that a caller can
/// match on. Every variant carries the full human-readable `message` (what failed and what to
/// do), which is also its `Display`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Offline (`HF_HUB_OFFLINE=1` or `HubOptions::offline` of the `hub` module) and a needed
    /// file is not in the Hugging Face cache.
    #[error("{message}")]
    OfflineNotCached {
        /// The Hub repository (`owner/name`).
        repo: String,
        /// The file(s) looked for.
        file: String,
        /// The full message.
        message: String,
    },
    /// The Hub does not have the file, revision or repository (HTTP 404), or none of the weight
    /// candidates of a checkpoint exists.
    #[error("{message}")]
    HubNotFound {
        /// The Hub repository (`owner/name`).
        repo: String,
        /// The file asked for (or the candidates tried, for "no weights").
        file: String,
        /// The full message.
        message: String,
    },
    /// The Hub refused access: authentication required (HTTP 401) or forbidden (HTTP 403).
    #[error("{message}")]
    Unauthorized {
        /// The Hub repository (`owner/name`).
        repo: String,
        /// The file asked for.
        file: String,
        /// 401 or 403.
        status: u16,
        /// The full message.
        message: String,
    },
    /// The Hub could not be reached or failed: a connection error or broken transfer, a server
    /// error (5xx) or rate limit (429) after retries, an unexpected answer.
    #[error("{message}")]
    Network {
        /// The Hub repository (`owner/name`), empty when not about one.
        repo: String,
        /// The file asked for, empty when not about one.
        file: String,
        /// The HTTP status, when there was an answer.
        status: Option<u16>,
        /// The full message.
        message: String,
    },
    /// A downloaded file differs from what it must be (SHA-256 pinned in the manifest or given
    /// by the Hub's ETag, size, JSON that does not parse, shards that disagree with the
    /// manifest). A corrupt download is deleted from the cache.
    #[error("{message}")]
    IntegrityMismatch {
        /// The Hub repository (`owner/name`).
        repo: String,
        /// The file that failed the check.
        file: String,
        /// The full message.
        message: String,
    },
    /// A file could not be opened, read or written (checkpoint, image, config, cache).
    #[error("{message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The full message.
        message: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A weight file in a format this crate does not read (legacy non-zip pickle, an unknown
    /// format, a `.pth` without `data.pkl` or without any tensor).
    #[error("{message}")]
    UnsupportedCheckpoint {
        /// The file.
        path: PathBuf,
        /// The full message.
        message: String,
    },
    /// A weight file that ends early (a cut download or copy).
    #[error("{message}")]
    TruncatedCheckpoint {
        /// The file.
        path: PathBuf,
        /// The full message.
        message: String,
    },
    /// A weight file of a known format whose content is malformed (a corrupt pickle or header,
    /// a tensor view outside its storage, a shard index with hostile or invalid entries).
    #[error("{message}")]
    InvalidCheckpoint {
        /// The file.
        path: PathBuf,
        /// The full message.
        message: String,
    },
    /// A tensor the network needs is not in the checkpoint (or the `.pth` entry that should
    /// hold the weights, e.g. `model_ema`, is absent): usually a `Config` that does not match.
    #[error("{message}")]
    MissingTensor {
        /// The official tensor name (or the missing `.pth` key).
        name: String,
        /// The full message.
        message: String,
    },
    /// A tensor of the checkpoint has another shape than the network expects.
    #[error("{message}")]
    ShapeMismatch {
        /// The official tensor name.
        name: String,
        /// The shape the network expects.
        expected: Vec<usize>,
        /// The shape in the checkpoint.
        found: Vec<usize>,
        /// The full message.
        message: String,
    },
    /// A floating tensor of the checkpoint holds NaN or Inf.
    #[error("{message}")]
    NonFinite {
        /// The tensor name as stored in the file.
        name: String,
        /// The full message.
        message: String,
    },
    /// Image bytes that cannot be decoded (unknown format, corrupt data, no pixels).
    #[error("{message}")]
    UndecodableImage {
        /// The full message.
        message: String,
    },
    /// An image over the pixel limit (`DecodeOptions::max_pixels` of the `preprocess` module),
    /// refused before its pixels are allocated.
    #[error("{message}")]
    ImageTooLarge {
        /// Width and height from the image header (`None` when the decoder refused the image
        /// before reporting them).
        dimensions: Option<(u32, u32)>,
        /// The limit in force.
        max_pixels: u64,
        /// The full message.
        message: String,
    },
    /// An invalid configuration: a `config.json` that does not parse, does not validate or
    /// does not match the expected architecture, bad preprocessing settings, an unknown
    /// variant or Hub repository id.
    #[error("{message}")]
    BadConfig {
        /// The full message.
        message: String,
    },
    /// A name that is not in the zoo ([`zoo::get`](crate::zoo::get)); the message lists the
    /// known names.
    #[error("{message}")]
    UnknownModel {
        /// The name asked for.
        name: String,
        /// The full message.
        message: String,
    },
}

impl Error {
    /// The typed error inside a `candle_core::Error`, if it carries one: looks through Candle's
    /// wrappers (`WithBacktrace`, `Context`, `WithPath`, `WrappedContext`, `Io`) and the
    /// `source()` chain of wrapped errors.
    ///
    /// ```
    /// use internimage::zoo;
    ///
    /// let err = zoo::get("internimage_z").unwrap_err(); // a candle_core::Error
    /// assert!(matches!(
    ///     internimage::Error::find(&err),
    ///     Some(internimage::Error::UnknownModel { name, .. }) if name == "internimage_z"
    /// ));
    /// // Context added by the caller does not hide it.
    /// let err = err.context("loading the classifier");
    /// assert!(internimage::Error::find(&err).is_some());
    /// ```
    pub fn find(err: &candle_core::Error) -> Option<&Error> {
        use candle_core::Error as C;
        match err {
            C::Io(io) => io.get_ref().and_then(|e| find_dyn(e)),
            C::WithBacktrace { inner, .. }
            | C::Context { inner, .. }
            | C::WithPath { inner, .. } => Self::find(inner),
            C::WrappedContext { wrapped, .. } | C::Cuda(wrapped) => find_dyn(wrapped.as_ref()),
            _ => None,
        }
    }

    /// The human-readable message (the same as `Display`).
    pub fn message(&self) -> &str {
        match self {
            Error::OfflineNotCached { message, .. }
            | Error::HubNotFound { message, .. }
            | Error::Unauthorized { message, .. }
            | Error::Network { message, .. }
            | Error::IntegrityMismatch { message, .. }
            | Error::Io { message, .. }
            | Error::UnsupportedCheckpoint { message, .. }
            | Error::TruncatedCheckpoint { message, .. }
            | Error::InvalidCheckpoint { message, .. }
            | Error::MissingTensor { message, .. }
            | Error::ShapeMismatch { message, .. }
            | Error::NonFinite { message, .. }
            | Error::UndecodableImage { message }
            | Error::ImageTooLarge { message, .. }
            | Error::BadConfig { message }
            | Error::UnknownModel { message, .. } => message,
        }
    }

    fn message_mut(&mut self) -> &mut String {
        match self {
            Error::OfflineNotCached { message, .. }
            | Error::HubNotFound { message, .. }
            | Error::Unauthorized { message, .. }
            | Error::Network { message, .. }
            | Error::IntegrityMismatch { message, .. }
            | Error::Io { message, .. }
            | Error::UnsupportedCheckpoint { message, .. }
            | Error::TruncatedCheckpoint { message, .. }
            | Error::InvalidCheckpoint { message, .. }
            | Error::MissingTensor { message, .. }
            | Error::ShapeMismatch { message, .. }
            | Error::NonFinite { message, .. }
            | Error::UndecodableImage { message }
            | Error::ImageTooLarge { message, .. }
            | Error::BadConfig { message }
            | Error::UnknownModel { message, .. } => message,
        }
    }

    /// The `std::io::ErrorKind` of the `std::io::Error` that carries this error in Candle's.
    fn io_kind(&self) -> std::io::ErrorKind {
        use std::io::ErrorKind as K;
        match self {
            Error::OfflineNotCached { .. } | Error::HubNotFound { .. } => K::NotFound,
            Error::MissingTensor { .. } => K::NotFound,
            Error::Unauthorized { .. } => K::PermissionDenied,
            Error::Network { .. } => K::Other,
            Error::Io { source, .. } => source.kind(),
            Error::UnsupportedCheckpoint { .. } => K::Unsupported,
            Error::TruncatedCheckpoint { .. } => K::UnexpectedEof,
            Error::IntegrityMismatch { .. }
            | Error::InvalidCheckpoint { .. }
            | Error::ShapeMismatch { .. }
            | Error::NonFinite { .. }
            | Error::UndecodableImage { .. } => K::InvalidData,
            Error::ImageTooLarge { .. } | Error::BadConfig { .. } | Error::UnknownModel { .. } => {
                K::InvalidInput
            }
        }
    }

    /// A `BadConfig` error.
    pub(crate) fn bad_config(message: impl Into<String>) -> Self {
        Error::BadConfig {
            message: message.into(),
        }
    }

    /// An `Io` error about `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, message: String, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            message,
            source,
        }
    }
}

/// The typed error in a `dyn Error` or its `source()` chain.
fn find_dyn<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a Error> {
    let mut cur: Option<&'a (dyn std::error::Error + 'static)> = Some(err);
    // Bounded: a cyclic or very deep source chain must not hang.
    for _ in 0..64 {
        let e = cur?;
        if let Some(found) = e.downcast_ref::<Error>() {
            return Some(found);
        }
        if let Some(c) = e.downcast_ref::<candle_core::Error>() {
            return Error::find(c);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            cur = Some(inner);
            continue;
        }
        cur = e.source();
    }
    None
}

impl From<Error> for candle_core::Error {
    /// `candle_core::Error::Io` carrying the error (no backtrace: its `Display` is the message).
    fn from(e: Error) -> Self {
        candle_core::Error::Io(std::io::Error::new(e.io_kind(), e))
    }
}

/// Takes the typed error out of a `candle_core::Error` made from one (dropping a backtrace
/// Candle may have attached); any other error is given back unchanged.
pub(crate) fn take(err: candle_core::Error) -> std::result::Result<Error, candle_core::Error> {
    match err {
        candle_core::Error::WithBacktrace { inner, backtrace } => {
            take(*inner).map_err(|inner| candle_core::Error::WithBacktrace {
                inner: Box::new(inner),
                backtrace,
            })
        }
        candle_core::Error::Io(io) if io.get_ref().is_some_and(|e| e.is::<Error>()) => {
            let kind = io.kind();
            match io.into_inner() {
                Some(inner) => inner
                    .downcast::<Error>()
                    .map(|e| *e)
                    .map_err(|other| candle_core::Error::Io(std::io::Error::new(kind, other))),
                None => Err(candle_core::Error::Io(std::io::Error::from(kind))),
            }
        }
        other => Err(other),
    }
}

/// `err` with its message rewritten by `f`.
pub(crate) fn with_message(mut err: Error, f: impl FnOnce(&str) -> String) -> Error {
    let m = f(err.message());
    *err.message_mut() = m;
    err
}

/// `err` with its message rewritten by `f` (e.g. to name the file it is about), keeping its
/// typed variant when it has one; other errors become a message without backtrace.
pub(crate) fn rewrite(
    err: candle_core::Error,
    f: impl FnOnce(&str) -> String,
) -> candle_core::Error {
    match take(err) {
        Ok(e) => with_message(e, f).into(),
        Err(other) => candle_core::Error::Msg(f(&user_message(&other))),
    }
}

/// The message of any `candle_core::Error` for a user: without the backtrace Candle attaches when
/// `RUST_BACKTRACE` is set (at any depth), context first (`context: message`).
///
/// ```
/// let err = internimage::zoo::get("internimage_z").unwrap_err().context("loading");
/// let shown = internimage::error::user_message(&err);
/// assert!(shown.starts_with("loading: unknown InternImage model \"internimage_z\""));
/// assert!(!shown.contains('\n'));
/// ```
pub fn user_message(err: &candle_core::Error) -> String {
    match err {
        candle_core::Error::WithBacktrace { inner, .. } => user_message(inner),
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", user_message(inner))
        }
        candle_core::Error::WithPath { inner, path } => {
            format!("path: {path:?} {}", user_message(inner))
        }
        other => other.to_string(),
    }
}
