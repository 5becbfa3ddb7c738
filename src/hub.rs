//! Download checkpoints from the Hugging Face Hub (cargo feature `hub`, on by default).
//!
//! Built on the blocking client of `hf-hub` 1.0. Files go to the standard Hugging Face cache
//! (`<cache>/models--<owner>--<name>/{blobs,snapshots,refs}`), shared with the Python tools.
//!
//! * Cache: [`HubOptions::cache_dir`] > `HF_HUB_CACHE` > `HF_HOME/hub` >
//!   `~/.cache/huggingface/hub`. Endpoint: [`HubOptions::endpoint`] > `HF_ENDPOINT` >
//!   `https://huggingface.co`. Token: [`HubOptions::token`] > `HF_TOKEN` > the token file of
//!   `huggingface-cli login`. (`hf-hub` reads these variables itself.)
//! * Weights: the first of these that exists is used (one list, [`Hub::fetch_with_fallback`]):
//!   the manifest's safetensors (`model.safetensors`, or its index
//!   `model.safetensors.index.json` and the shards), then `pytorch_model.bin`, then
//!   `pytorch_model.bin.index.json` and its shards (same repository), then the release's `.pth` in
//!   `OpenGVLab/InternImage` (zoo models). Only "not found" (404) moves to the next; any other
//!   failure is an error. `config.json` is optional (the zoo preset is used without it; one that is
//!   there must agree with the preset). The progress bar names the file actually fetched.
//! * Cache first: a file already in the cache is used without any request (the candidates are
//!   looked up in the cache in the same order before any request, so a fallback found once is
//!   found again without requests). `HF_HUB_OFFLINE=1`
//!   (read by [`HubOptions::from_env`]) or [`HubOptions::offline`] means cache only: a missing
//!   file is an error that names it and says how to get it.
//! * Integrity: every downloaded file is hashed (SHA-256) and compared with the hash pinned in
//!   the manifest, or else with the Hub's ETag when it is a SHA-256 (it is for the large LFS
//!   weight files). A mismatch deletes the blob and its snapshot link, so a corrupt or truncated
//!   file is never loaded and never left in the cache as if it were good. JSON files are parsed
//!   before they are accepted.
//! * Failures: requests are retried by `hf-hub` on connection errors, 429 and 5xx; a download
//!   that breaks off or fails the integrity check is restarted ([`HubOptions::download_attempts`]).
//!   404, 401, 403 and the rest become errors that say what was asked and what to do, and that
//!   a caller can match with [`crate::Error::find`]: [`crate::Error::OfflineNotCached`],
//!   [`crate::Error::HubNotFound`], [`crate::Error::Unauthorized`], [`crate::Error::Network`],
//!   [`crate::Error::IntegrityMismatch`].
//! * Progress: a one-line bar on stderr while downloading, only when stderr is a terminal.
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use internimage::InternImage;
//!
//! let model = InternImage::from_pretrained("internimage_t_1k_224", DType::F32, &Device::Cpu)?;
//! # Ok::<(), candle_core::Error>(())
//! ```

use crate::error::Error as IoError;
use crate::model::{Config, InternImage};
use crate::zoo::{self, HubFile, HubRepo, PretrainedModel, PthFile};
use candle_core::{bail, DType, Device, Error, Result};
use hf_hub::progress::{DownloadEvent, FileStatus, Progress, ProgressEvent, ProgressHandler};
use hf_hub::{HFClient, HFClientSync, HFError, HFRepositorySync, RepoTypeModel};
use sha2::{Digest, Sha256};
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Name of the index file of a sharded safetensors checkpoint.
pub const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

/// How to reach the Hub and where to cache. `Default` = the `hf-hub` defaults (which read
/// `HF_ENDPOINT`, `HF_HUB_CACHE`, `HF_HOME` and `HF_TOKEN`), online, progress bar on.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Hub base URL (`None` = `HF_ENDPOINT` or `https://huggingface.co`).
    pub endpoint: Option<String>,
    /// Cache directory, the `hub` folder itself (`None` = `HF_HUB_CACHE`, `HF_HOME/hub`,
    /// `~/.cache/huggingface/hub`).
    pub cache_dir: Option<PathBuf>,
    /// Access token (`None` = `HF_TOKEN` or the saved login token).
    pub token: Option<String>,
    /// Cache only: never make a request (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Revision (branch, tag or commit) that overrides the one in the manifest.
    pub revision: Option<String>,
    /// Draw a progress bar on stderr while downloading (only when stderr is a terminal).
    pub progress: bool,
    /// Retries of each request on connection errors, 429 and 5xx (`None` = the `hf-hub`
    /// default, 5, with exponential backoff).
    pub retry_max_attempts: Option<usize>,
    /// Attempts at downloading one file when the transfer breaks off or fails the integrity
    /// check (at least 1; default 2).
    pub download_attempts: usize,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self {
            endpoint: None,
            cache_dir: None,
            token: None,
            offline: false,
            revision: None,
            progress: true,
            retry_max_attempts: None,
            download_attempts: 2,
        }
    }
}

impl HubOptions {
    /// The defaults plus `HF_HUB_OFFLINE` (`1`, `true`, `yes` or `on` = cache only).
    pub fn from_env() -> Self {
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            })
            .unwrap_or(false);
        Self {
            offline,
            ..Self::default()
        }
    }

    /// Uses this Hub base URL (e.g. a mirror, or a test server).
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self
    }

    /// Uses this cache directory (the `hub` folder).
    pub fn with_cache_dir(mut self, cache_dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = Some(cache_dir.into());
        self
    }

    /// Uses this access token.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Cache only (`true`) or cache first, then the network (`false`).
    pub fn with_offline(mut self, offline: bool) -> Self {
        self.offline = offline;
        self
    }

    /// Fetches this revision instead of the manifest's.
    pub fn with_revision(mut self, revision: impl Into<String>) -> Self {
        self.revision = Some(revision.into());
        self
    }

    /// Turns the stderr progress bar on or off.
    pub fn with_progress(mut self, progress: bool) -> Self {
        self.progress = progress;
        self
    }

    /// Sets how often `hf-hub` retries a failed request (0 = no retry).
    pub fn with_retry_max_attempts(mut self, n: usize) -> Self {
        self.retry_max_attempts = Some(n);
        self
    }

    /// Sets how many times one file is downloaded before giving up (at least 1).
    pub fn with_download_attempts(mut self, n: usize) -> Self {
        self.download_attempts = n;
        self
    }
}

/// Local paths of a checkpoint's files, in the Hugging Face cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// The repository's `config.json`, if it has one (and one was asked for).
    pub config: Option<PathBuf>,
    /// The shard index of a sharded checkpoint.
    pub index: Option<PathBuf>,
    /// The weight files (one, or every shard in order).
    pub weights: Vec<PathBuf>,
}

/// A configured Hub client (one per [`HubOptions`]).
#[derive(Debug)]
pub struct Hub {
    client: HFClientSync,
    endpoint: String,
    cache_dir: PathBuf,
    options: HubOptions,
}

impl Hub {
    /// Builds the client (no request is made).
    pub fn new(options: HubOptions) -> Result<Self> {
        let mut builder = HFClient::builder();
        if let Some(endpoint) = &options.endpoint {
            builder = builder.endpoint(endpoint.clone());
        }
        if let Some(dir) = &options.cache_dir {
            builder = builder.cache_dir(dir.clone());
        }
        if let Some(token) = &options.token {
            builder = builder.token(token.clone());
        }
        if let Some(n) = options.retry_max_attempts {
            builder = builder.retry_max_attempts(n);
        }
        let client = builder.build().map_err(|e| {
            IoError::bad_config(format!(
                "cannot set up the Hugging Face Hub client: {e} (check HF_ENDPOINT / the endpoint: it must be a URL such as https://huggingface.co)"
            ))
        })?;
        let endpoint = client.endpoint().to_string();
        let cache_dir = client.cache_dir().to_path_buf();
        let client = HFClientSync::from_inner(client).map_err(|e| IoError::Network {
            repo: String::new(),
            file: String::new(),
            status: None,
            message: format!("cannot start the Hub client: {e}"),
        })?;
        Ok(Self {
            client,
            endpoint,
            cache_dir,
            options,
        })
    }

    /// The Hub base URL in use.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The cache directory in use (the `hub` folder).
    pub fn cache_dir(&self) -> &Path {
        &self.cache_dir
    }

    /// The options this client was built with.
    pub fn options(&self) -> &HubOptions {
        &self.options
    }

    /// Local paths of the files of the zoo model `name` (see [`zoo::get`]), with the release's
    /// `.pth` as the last fallback (see [`Hub::fetch_with_fallback`]).
    pub fn fetch_model(&self, name: &str) -> Result<ModelFiles> {
        let model = zoo::get(name)?;
        self.fetch_with_fallback(&model.hub, model.pth.as_ref())
    }

    /// Local paths of a checkpoint's files: the optional `config.json`, the shard index if
    /// any, and the weight files, downloading what is not cached yet (see
    /// [`Hub::fetch_with_fallback`], here without a `.pth` fallback).
    pub fn fetch_repo(&self, repo: &HubRepo) -> Result<ModelFiles> {
        self.fetch_with_fallback(repo, None)
    }

    /// Local paths of a checkpoint's files. The weights are the first of these that exists:
    /// the manifest's files (for a single `model.safetensors`, then its shard index
    /// `model.safetensors.index.json`), `pytorch_model.bin`, `pytorch_model.bin.index.json`
    /// (in `repo`), then `pth` (the official `.pth` release, at its own revision). The cache is
    /// searched first, in that order, without any request; online, the Hub is then asked in the
    /// same order. Only "not found" (HTTP 404) moves to the next candidate: authentication,
    /// server, transfer and integrity failures are errors. `config.json` is optional.
    pub fn fetch_with_fallback(&self, repo: &HubRepo, pth: Option<&PthFile>) -> Result<ModelFiles> {
        let revision = self
            .options
            .revision
            .clone()
            .unwrap_or_else(|| repo.revision.clone());
        let config = match &repo.config_file {
            Some(name) => {
                let handle = self.repo_handle(&repo.repo)?;
                let ctx = FileCtx {
                    repo: &repo.repo,
                    revision: &revision,
                    file: name.clone(),
                };
                self.fetch(&handle, &ctx, &HubFile::new(name.clone()), true)?
            }
            None => None,
        };
        let candidates = weight_candidates(repo, &revision, pth);

        // 1. The cache, every candidate in order (never a request).
        for c in &candidates {
            if let Some((index, weights)) = self.resolve_candidate(c, true)? {
                return Ok(ModelFiles {
                    config,
                    index,
                    weights,
                });
            }
        }
        if self.options.offline {
            return Err(self.offline_missing_error(&repo.repo, &candidates));
        }

        // 2. The Hub, in the same order; a 404 on a candidate moves to the next.
        for c in &candidates {
            if let Some((index, weights)) = self.resolve_candidate(c, false)? {
                return Ok(ModelFiles {
                    config,
                    index,
                    weights,
                });
            }
        }
        Err(self.all_missing_error(&repo.repo, &candidates))
    }

    /// The files of one candidate: `Ok(None)` when its first file (the weights or the index)
    /// does not exist (`cache_only`: is not cached). A later file missing is an error.
    fn resolve_candidate(
        &self,
        c: &Candidate,
        cache_only: bool,
    ) -> Result<Option<(Option<PathBuf>, Vec<PathBuf>)>> {
        let handle = self.repo_handle(&c.repo)?;
        let get = |file: &HubFile, first: bool| -> Result<Option<PathBuf>> {
            let ctx = FileCtx {
                repo: &c.repo,
                revision: &c.revision,
                file: file.name.clone(),
            };
            let found = if cache_only {
                self.cached(&handle, &ctx)?
            } else {
                self.fetch(&handle, &ctx, file, true)?
            };
            match found {
                None if !first && !cache_only => Err(self.missing_error(&ctx)),
                found => Ok(found),
            }
        };
        match &c.kind {
            CandidateKind::Files(files) => {
                let mut weights = Vec::with_capacity(files.len());
                for (i, f) in files.iter().enumerate() {
                    match get(f, i == 0)? {
                        Some(p) => weights.push(p),
                        None => return Ok(None),
                    }
                }
                Ok(Some((None, weights)))
            }
            CandidateKind::Index { index, listed } => {
                let Some(index_path) = get(index, true)? else {
                    return Ok(None);
                };
                let shards = crate::checkpoint::shard_names(&index_path)?;
                check_listed_shards(c, &index.name, listed, &shards)?;
                let mut weights = Vec::with_capacity(shards.len());
                for shard in &shards {
                    let file = listed
                        .iter()
                        .find(|f| &f.name == shard)
                        .cloned()
                        .unwrap_or_else(|| HubFile::new(shard.clone()));
                    match get(&file, false)? {
                        Some(p) => weights.push(p),
                        None => return Ok(None),
                    }
                }
                Ok(Some((Some(index_path), weights)))
            }
        }
    }

    /// Local path of the `.pth` alternative of a release (in `OpenGVLab/InternImage`),
    /// downloading it if needed. Load it with `InternImage::from_checkpoint`.
    pub fn fetch_pth(&self, model: &PretrainedModel) -> Result<PathBuf> {
        let Some(pth) = &model.pth else {
            bail!(
                "{} has no .pth release; use its safetensors (fetch_model)",
                model.name
            )
        };
        let revision = self
            .options
            .revision
            .clone()
            .unwrap_or_else(|| pth.revision.clone());
        let ctx = FileCtx {
            repo: &pth.repo,
            revision: &revision,
            file: pth.file.clone(),
        };
        let handle = self.repo_handle(&pth.repo)?;
        match self.fetch(&handle, &ctx, &HubFile::new(pth.file.clone()), false)? {
            Some(p) => Ok(p),
            None => Err(self.missing_error(&ctx)),
        }
    }

    /// Local path of one file of `repo` (`owner/name`) at `revision`, downloading it if needed.
    /// `Ok(None)` when the Hub says the file does not exist (404); offline, a file that is not
    /// cached is an error.
    pub fn fetch_file(
        &self,
        repo: &str,
        revision: &str,
        file: &HubFile,
    ) -> Result<Option<PathBuf>> {
        let handle = self.repo_handle(repo)?;
        let ctx = FileCtx {
            repo,
            revision,
            file: file.name.clone(),
        };
        self.fetch(&handle, &ctx, file, false)
    }

    fn repo_handle(&self, repo: &str) -> Result<HFRepositorySync<RepoTypeModel>> {
        let mut parts = repo.split('/');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(owner), Some(name), None) if !owner.is_empty() && !name.is_empty() => {
                Ok(self.client.model(owner, name))
            }
            _ => Err(IoError::bad_config(format!(
                "invalid Hub repository id {repo:?}: expected \"owner/name\""
            ))
            .into()),
        }
    }

    fn missing_error(&self, ctx: &FileCtx) -> Error {
        IoError::HubNotFound {
            repo: ctx.repo.to_string(),
            file: ctx.file.clone(),
            message: format!(
                "{} not found in the Hub repository {} at revision {} ({}, HTTP 404): check the model name and revision",
                ctx.file, ctx.repo, ctx.revision, self.endpoint
            ),
        }
        .into()
    }

    /// Offline, no weight candidate is in the cache: say what was looked for.
    fn offline_missing_error(&self, repo: &str, candidates: &[Candidate]) -> Error {
        let looked: Vec<String> = candidates.iter().map(Candidate::describe).collect();
        IoError::OfflineNotCached {
            repo: repo.to_string(),
            file: looked.join(", "),
            message: format!(
                "offline mode (HF_HUB_OFFLINE=1): no weights of {repo} are in the Hugging Face cache {}; looked for, in order: {}; unset HF_HUB_OFFLINE (or turn offline off) to download them, or load local weights instead (--weights PATH in the examples, InternImage::from_checkpoint_files in code)",
                self.cache_dir.display(),
                looked.join(", ")
            ),
        }
        .into()
    }

    /// Online, the Hub has none of the weight candidates: name every URL tried.
    fn all_missing_error(&self, repo: &str, candidates: &[Candidate]) -> Error {
        let urls: Vec<String> = candidates.iter().map(|c| c.url(&self.endpoint)).collect();
        IoError::HubNotFound {
            repo: repo.to_string(),
            file: candidates
                .iter()
                .map(Candidate::names)
                .collect::<Vec<_>>()
                .join(", "),
            message: format!(
                "no weights of {repo} found on the Hub: every candidate was not found (HTTP 404): {}; check the model name and revision, or download the weights yourself and pass local files (--weights PATH [--config config.json] in the examples, InternImage::from_checkpoint_files(&cfg, &[path], dtype, &device) in code)",
                urls.join(", ")
            ),
        }
        .into()
    }

    fn offline_error(&self, ctx: &FileCtx) -> Error {
        IoError::OfflineNotCached {
            repo: ctx.repo.to_string(),
            file: ctx.file.clone(),
            message: format!(
                "offline mode (HF_HUB_OFFLINE=1): {} of {} at revision {} is not in the Hugging Face cache {}; unset HF_HUB_OFFLINE (or turn offline off) to download it, or load local weights instead (--weights PATH in the examples, InternImage::from_checkpoint_files in code)",
                ctx.file,
                ctx.repo,
                ctx.revision,
                self.cache_dir.display()
            ),
        }
        .into()
    }

    /// One file from the cache only (never a request): `Ok(None)` when it is not there (or
    /// the cache remembers that the Hub does not have it).
    fn cached(
        &self,
        handle: &HFRepositorySync<RepoTypeModel>,
        ctx: &FileCtx,
    ) -> Result<Option<PathBuf>> {
        let cached = handle
            .download_file()
            .filename(ctx.file.clone())
            .revision(ctx.revision.to_string())
            .local_files_only(true)
            .send();
        match cached {
            Ok(path) => Ok(Some(path)),
            Err(HFError::LocalEntryNotFound { .. }) | Err(HFError::EntryNotFound { .. }) => {
                Ok(None)
            }
            Err(e) => Err(self.hub_error(ctx, e).into()),
        }
    }

    /// One file: the cache first, then (online) the network. `Ok(None)` = the Hub says it does
    /// not exist, or (`optional`, offline) it is not cached.
    fn fetch(
        &self,
        handle: &HFRepositorySync<RepoTypeModel>,
        ctx: &FileCtx,
        file: &HubFile,
        optional: bool,
    ) -> Result<Option<PathBuf>> {
        // 1. The cache (never a request).
        if let Some(path) = self.cached(handle, ctx)? {
            return Ok(Some(path));
        }
        if self.options.offline {
            if optional {
                return Ok(None);
            }
            return Err(self.offline_error(ctx));
        }

        // 2. The network, restarting broken or corrupt transfers.
        let attempts = self.options.download_attempts.max(1);
        let mut last_error: Option<IoError> = None;
        for attempt in 1..=attempts {
            if attempt > 1 {
                std::thread::sleep(Duration::from_millis(200 * attempt as u64));
            }
            let progress = (self.options.progress && std::io::stderr().is_terminal())
                .then(|| Progress::new(StderrProgress::new(format!("{}/{}", ctx.repo, file.name))));
            let request = handle
                .download_file()
                .filename(file.name.clone())
                .revision(ctx.revision.to_string())
                .maybe_progress(progress);
            match request.send() {
                Ok(path) => match verify_download(&path, file) {
                    Ok(()) => return Ok(Some(path)),
                    Err(msg) => {
                        last_error = Some(IoError::IntegrityMismatch {
                            repo: ctx.repo.to_string(),
                            file: ctx.file.clone(),
                            message: format!(
                                "{} of {}@{} from {} failed the integrity check: {msg}; the download was deleted from the cache",
                                ctx.file, ctx.repo, ctx.revision, self.endpoint
                            ),
                        })
                    }
                },
                Err(HFError::EntryNotFound { .. }) => return Ok(None),
                Err(e) if is_retryable(&e) => last_error = Some(self.hub_error(ctx, e)),
                Err(e) => return Err(self.hub_error(ctx, e).into()),
            }
        }
        let mut last = last_error.unwrap_or_else(|| IoError::Network {
            repo: ctx.repo.to_string(),
            file: ctx.file.clone(),
            status: None,
            message: format!("{} of {}: no download attempt was made", ctx.file, ctx.repo),
        });
        if attempts > 1 {
            last = crate::error::with_message(last, |m| {
                format!("{m} (gave up after {attempts} attempts)")
            });
        }
        Err(last.into())
    }

    /// A failure of the Hub client as a typed error that says what was asked and what to do.
    fn hub_error(&self, ctx: &FileCtx, e: HFError) -> IoError {
        let what = format!(
            "{} of {} at revision {} ({})",
            ctx.file, ctx.repo, ctx.revision, self.endpoint
        );
        let status = hf_status(&e);
        let msg = match &e {
            HFError::EntryNotFound { .. } => {
                format!("{what}: not found (HTTP 404); check the model name and revision")
            }
            HFError::RepoNotFound { .. } => format!(
                "{what}: repository not found; check the name, or set HF_TOKEN if it is private"
            ),
            HFError::RevisionNotFound { .. } => {
                format!("{what}: revision not found in the repository")
            }
            HFError::AuthRequired { .. } => format!(
                "{what}: the Hub asks for authentication (HTTP 401): the repository does not exist or is private/gated; check the name, and set HF_TOKEN (or run `huggingface-cli login`) if you have access"
            ),
            HFError::Forbidden { .. } => format!(
                "{what}: access denied (HTTP 403): the token has no access (a gated repository needs its terms accepted on the Hub)"
            ),
            HFError::RateLimited { retry_after, .. } => format!(
                "{what}: rate limited by the Hub (HTTP 429){}; try again later or set HF_TOKEN",
                retry_after
                    .map(|d| format!(", retry after {} s", d.as_secs()))
                    .unwrap_or_default()
            ),
            HFError::Http { context } => {
                let status = context.status.as_u16();
                if (500..600).contains(&status) {
                    format!("{what}: the Hub server failed (HTTP {status}) after retries; try again later ({e})")
                } else {
                    format!("{what}: unexpected HTTP {status} ({e})")
                }
            }
            HFError::Request { .. } => format!(
                "{what}: network error ({e}); the transfer failed or broke off and nothing was cached; check the connection and HF_ENDPOINT, or use cached files with HF_HUB_OFFLINE=1"
            ),
            HFError::MalformedResponse { .. } => format!(
                "{what}: unexpected answer from the Hub ({e}); is the endpoint a Hugging Face Hub?"
            ),
            HFError::CacheLockTimeout { .. } => format!(
                "{what}: another process holds the cache lock ({e}); wait for it or remove the stale .lock file"
            ),
            HFError::Io(_) => format!("{what}: cannot write the cache {} ({e})", self.cache_dir.display()),
            _ => format!("{what}: {e}"),
        };
        let repo = ctx.repo.to_string();
        let file = ctx.file.clone();
        match e {
            HFError::EntryNotFound { .. }
            | HFError::RepoNotFound { .. }
            | HFError::RevisionNotFound { .. } => IoError::HubNotFound {
                repo,
                file,
                message: msg,
            },
            HFError::AuthRequired { .. } | HFError::Forbidden { .. } => IoError::Unauthorized {
                repo,
                file,
                status: status.unwrap_or(401),
                message: msg,
            },
            HFError::Io(source) => IoError::Io {
                path: self.cache_dir.clone(),
                message: msg,
                source,
            },
            _ => IoError::Network {
                repo,
                file,
                status,
                message: msg,
            },
        }
    }
}

/// The HTTP status of a Hub client error, when it is about an answer.
fn hf_status(e: &HFError) -> Option<u16> {
    match e {
        HFError::EntryNotFound { .. }
        | HFError::RepoNotFound { .. }
        | HFError::RevisionNotFound { .. } => Some(404),
        HFError::AuthRequired { .. } => Some(401),
        HFError::Forbidden { .. } => Some(403),
        HFError::RateLimited { .. } => Some(429),
        HFError::Http { context } => Some(context.status.as_u16()),
        _ => None,
    }
}

/// Name of the single-file PyTorch checkpoint of a Hugging Face repository (`save_pretrained`
/// with `safe_serialization=False`: a flat state dict, `model.` prefix).
pub const PYTORCH_BIN: &str = "pytorch_model.bin";

/// Name of the index file of a sharded `pytorch_model.bin` checkpoint.
pub const PYTORCH_BIN_INDEX: &str = "pytorch_model.bin.index.json";

/// One layout the weights of a checkpoint may have on the Hub.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    repo: String,
    revision: String,
    kind: CandidateKind,
}

#[derive(Debug, Clone)]
pub(crate) enum CandidateKind {
    /// These files, every one needed (one file, or the shards the manifest lists).
    Files(Vec<HubFile>),
    /// A shard index naming the shards; `listed` = the shards the manifest lists (if any),
    /// which must agree with the index.
    Index {
        index: HubFile,
        listed: Vec<HubFile>,
    },
}

impl Candidate {
    fn entry(&self) -> &str {
        match &self.kind {
            CandidateKind::Files(files) => files.first().map(|f| f.name.as_str()).unwrap_or(""),
            CandidateKind::Index { index, .. } => &index.name,
        }
    }

    fn names(&self) -> String {
        match &self.kind {
            CandidateKind::Files(files) => {
                let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
                names.join(" + ")
            }
            CandidateKind::Index { index, .. } => format!("{} + its shards", index.name),
        }
    }

    /// `repo@revision/file` (for the offline error).
    fn describe(&self) -> String {
        format!("{}@{}/{}", self.repo, self.revision, self.names())
    }

    /// The download URL of the candidate's first file.
    fn url(&self, endpoint: &str) -> String {
        format!(
            "{}/{}/resolve/{}/{}",
            endpoint.trim_end_matches('/'),
            self.repo,
            self.revision,
            self.entry()
        )
    }
}

/// The one place that decides where the weights are looked for, in order: the manifest's
/// files (a single `model.safetensors` also as `model.safetensors.index.json` + shards), then
/// `pytorch_model.bin` and `pytorch_model.bin.index.json` + shards in the same repository at
/// `revision`, then the release's `.pth` (at its own revision).
pub(crate) fn weight_candidates(
    repo: &HubRepo,
    revision: &str,
    pth: Option<&PthFile>,
) -> Vec<Candidate> {
    let here = |kind| Candidate {
        repo: repo.repo.clone(),
        revision: revision.to_string(),
        kind,
    };
    let mut out = Vec::new();
    match &repo.index_file {
        Some(index) => out.push(here(CandidateKind::Index {
            index: index.clone(),
            listed: repo.files.clone(),
        })),
        None => {
            if !repo.files.is_empty() {
                out.push(here(CandidateKind::Files(repo.files.clone())));
            }
            // A single `model.safetensors` may have been sharded since the manifest was written.
            if repo.files.len() == 1 && repo.files[0].name == "model.safetensors" {
                out.push(here(CandidateKind::Index {
                    index: HubFile::new(SAFETENSORS_INDEX),
                    listed: Vec::new(),
                }));
            }
        }
    }
    for (name, index) in [(PYTORCH_BIN, false), (PYTORCH_BIN_INDEX, true)] {
        if out.iter().any(|c| c.repo == repo.repo && c.entry() == name) {
            continue;
        }
        let file = HubFile::new(name);
        out.push(here(if index {
            CandidateKind::Index {
                index: file,
                listed: Vec::new(),
            }
        } else {
            CandidateKind::Files(vec![file])
        }));
    }
    if let Some(pth) = pth {
        out.push(Candidate {
            repo: pth.repo.clone(),
            revision: pth.revision.clone(),
            kind: CandidateKind::Files(vec![HubFile::new(pth.file.clone())]),
        });
    }
    out
}

/// The shards the manifest lists (if any) must be those the index names.
fn check_listed_shards(
    c: &Candidate,
    index: &str,
    listed: &[HubFile],
    shards: &[String],
) -> Result<()> {
    if listed.is_empty() {
        return Ok(());
    }
    let mut listed: Vec<&str> = listed.iter().map(|f| f.name.as_str()).collect();
    listed.sort_unstable();
    let mut indexed: Vec<&str> = shards.iter().map(String::as_str).collect();
    indexed.sort_unstable();
    if listed != indexed {
        return Err(IoError::IntegrityMismatch {
            repo: c.repo.clone(),
            file: index.to_string(),
            message: format!(
                "the shard index {index} of {}@{} names the shards [{}] but the manifest lists [{}]; the repository changed: update weights-manifest.json or pin the revision",
                c.repo,
                c.revision,
                indexed.join(", "),
                listed.join(", ")
            ),
        }
        .into());
    }
    Ok(())
}

/// What is being fetched, for error messages.
struct FileCtx<'a> {
    repo: &'a str,
    revision: &'a str,
    file: String,
}

/// Errors worth restarting the whole download for (a broken transfer, a server failure).
fn is_retryable(e: &HFError) -> bool {
    match e {
        HFError::Request { .. } => true,
        HFError::Http { context } => (500..600).contains(&context.status.as_u16()),
        _ => false,
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The ETag of a cached file: the name of the blob its snapshot entry links to.
fn cached_etag(snapshot: &Path) -> Option<String> {
    let target = std::fs::read_link(snapshot).ok()?;
    target.file_name()?.to_str().map(str::to_string)
}

/// Deletes a snapshot entry and the blob it points to.
fn purge_cached(snapshot: &Path) {
    if let Ok(target) = std::fs::read_link(snapshot) {
        let blob = match snapshot.parent() {
            Some(dir) if target.is_relative() => dir.join(&target),
            _ => target,
        };
        let _ = std::fs::remove_file(blob);
    }
    let _ = std::fs::remove_file(snapshot);
}

/// SHA-256 of a file, as 64 lowercase hex digits, and its size.
pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut f = std::fs::File::open(path)
        .map_err(|e| IoError::io(path, format!("cannot open {}: {e}", path.display()), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| IoError::io(path, format!("cannot read {}: {e}", path.display()), e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    let digest = hasher.finalize();
    let hex = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok((hex, len))
}

/// Checks a fresh download; on failure deletes it from the cache and says why.
fn verify_download(path: &Path, file: &HubFile) -> std::result::Result<(), String> {
    let result = check_file(path, file);
    if result.is_err() {
        purge_cached(path);
    }
    result
}

fn check_file(path: &Path, file: &HubFile) -> std::result::Result<(), String> {
    let expected = match &file.sha256 {
        Some(pinned) => Some((pinned.to_ascii_lowercase(), "pinned in the manifest")),
        None => cached_etag(path)
            .filter(|etag| is_sha256_hex(etag))
            .map(|etag| (etag.to_ascii_lowercase(), "the Hub's ETag")),
    };
    if let Some((expected, source)) = expected {
        let (actual, len) = sha256_file(path).map_err(|e| e.to_string())?;
        if actual != expected {
            return Err(format!(
                "sha256 {actual} ({len} bytes) differs from {expected} ({source})"
            ));
        }
    }
    if let (Some(size), true) = (file.size_bytes, file.size_exact) {
        let len = std::fs::metadata(path)
            .map(|m| m.len())
            .map_err(|e| e.to_string())?;
        if len != size {
            return Err(format!("{len} bytes, expected {size}"));
        }
    }
    if file.name.ends_with(".json") {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        serde_json::from_str::<serde_json::Value>(&text)
            .map_err(|e| format!("not valid JSON ({e})"))?;
    }
    Ok(())
}

/// Local paths of the files of the zoo model `name`, downloading what is missing
/// (see [`Hub::fetch_repo`]).
pub fn download_model(name: &str, options: &HubOptions) -> Result<ModelFiles> {
    Hub::new(options.clone())?.fetch_model(name)
}

/// Local paths of the files of any Hub checkpoint described by `repo`, downloading what is
/// missing (see [`Hub::fetch_repo`]).
pub fn download_repo(repo: &HubRepo, options: &HubOptions) -> Result<ModelFiles> {
    Hub::new(options.clone())?.fetch_repo(repo)
}

/// Checks the repository's `config.json` against the architecture we are about to build.
fn check_config_json(path: &Path, cfg: &Config, what: &str) -> Result<()> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| IoError::io(path, format!("cannot read {}: {e}", path.display()), e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| IoError::bad_config(format!("invalid config.json {}: {e}", path.display())))?;
    let as_usizes = |key: &str| -> Option<Vec<usize>> {
        v.get(key)?
            .as_array()?
            .iter()
            .map(|x| x.as_u64().map(|x| x as usize))
            .collect()
    };
    let mut diffs = Vec::new();
    if let Some(c) = v.get("channels").and_then(|x| x.as_u64()) {
        if c as usize != cfg.channels {
            diffs.push(format!("channels {c} vs {}", cfg.channels));
        }
    }
    if let Some(d) = as_usizes("depths") {
        if d != cfg.depths {
            diffs.push(format!("depths {d:?} vs {:?}", cfg.depths));
        }
    }
    if let Some(g) = as_usizes("groups") {
        if g != cfg.groups {
            diffs.push(format!("groups {g:?} vs {:?}", cfg.groups));
        }
    }
    if let Some(n) = v.get("num_classes").and_then(|x| x.as_u64()) {
        if n as usize != cfg.num_classes {
            diffs.push(format!("num_classes {n} vs {}", cfg.num_classes));
        }
    }
    if !diffs.is_empty() {
        return Err(IoError::bad_config(format!(
            "the config.json of {what} ({}) does not match the expected architecture: {} (Hub value vs expected); update weights-manifest.json or pin the revision",
            path.display(),
            diffs.join(", ")
        ))
        .into());
    }
    Ok(())
}

impl InternImage {
    /// Downloads (or finds in the cache) the released checkpoint `name` (see [`zoo::list`])
    /// and builds the network, with [`HubOptions::from_env`] (so `HF_HUB_OFFLINE=1` means
    /// cache only).
    pub fn from_pretrained(name: &str, dtype: DType, device: &Device) -> Result<InternImage> {
        Self::from_pretrained_with(name, &HubOptions::from_env(), dtype, device)
    }

    /// [`InternImage::from_pretrained`] with explicit Hub options.
    pub fn from_pretrained_with(
        name: &str,
        options: &HubOptions,
        dtype: DType,
        device: &Device,
    ) -> Result<InternImage> {
        let model: &PretrainedModel = zoo::get(name)?;
        let cfg = model.config();
        Self::from_hub_with(
            &model.hub,
            model.pth.as_ref(),
            Some(&cfg),
            options,
            dtype,
            device,
        )
    }

    /// Downloads (or finds in the cache) the checkpoint described by `repo` and builds the
    /// network with `config`, or, when `config` is `None`, with the repository's `config.json`.
    /// When both exist, the `config.json` must agree with `config` (channels, depths, groups,
    /// classes).
    pub fn from_hub(
        repo: &HubRepo,
        config: Option<&Config>,
        options: &HubOptions,
        dtype: DType,
        device: &Device,
    ) -> Result<InternImage> {
        Self::from_hub_with(repo, None, config, options, dtype, device)
    }

    /// [`InternImage::from_hub`] with the official `.pth` release `pth` as the last weight
    /// fallback (the resolution order is that of [`Hub::fetch_with_fallback`]).
    pub fn from_hub_with(
        repo: &HubRepo,
        pth: Option<&PthFile>,
        config: Option<&Config>,
        options: &HubOptions,
        dtype: DType,
        device: &Device,
    ) -> Result<InternImage> {
        let files = Hub::new(options.clone())?.fetch_with_fallback(repo, pth)?;
        let cfg = match (config, &files.config) {
            (Some(cfg), Some(path)) => {
                check_config_json(path, cfg, &repo.repo)?;
                cfg.clone()
            }
            (Some(cfg), None) => cfg.clone(),
            (None, Some(path)) => Config::from_file(path)?,
            (None, None) => {
                return Err(IoError::bad_config(format!(
                "{} has no config.json and no configuration was given: pass one (e.g. Config::t())",
                repo.repo
            ))
                .into())
            }
        };
        InternImage::from_checkpoint_files(&cfg, &files.weights, dtype, device)
    }
}

/// Minimum time between two redraws of the progress bar.
const REDRAW_EVERY: Duration = Duration::from_millis(100);

/// A one-line download progress bar on stderr (`\r` redraws). Draws nothing when stderr is not
/// a terminal.
#[derive(Debug)]
pub struct StderrProgress {
    label: String,
    tty: bool,
    state: Mutex<BarState>,
}

#[derive(Debug, Default)]
struct BarState {
    done: u64,
    total: u64,
    started: Option<Instant>,
    last_draw: Option<Instant>,
    drawn: bool,
    last_len: usize,
}

impl StderrProgress {
    /// A bar labelled `label` (e.g. `OpenGVLab/internimage_t_1k_224/model.safetensors`).
    pub fn new(label: impl Into<String>) -> Self {
        Self {
            label: label.into(),
            tty: std::io::stderr().is_terminal(),
            state: Mutex::new(BarState::default()),
        }
    }

    fn draw(&self, s: &mut BarState, force: bool) {
        let now = Instant::now();
        if !force
            && s.last_draw
                .is_some_and(|t| now.duration_since(t) < REDRAW_EVERY)
        {
            return;
        }
        s.last_draw = Some(now);
        s.drawn = true;
        let mb = |b: u64| b as f64 / 1e6;
        let secs = s
            .started
            .map(|t| now.duration_since(t).as_secs_f64())
            .unwrap_or(0.0);
        let rate = if secs > 0.0 { mb(s.done) / secs } else { 0.0 };
        let line = if s.total > 0 {
            let frac = (s.done as f64 / s.total as f64).clamp(0.0, 1.0);
            let width = 24usize;
            let filled = (frac * width as f64).round() as usize;
            format!(
                "\r{} [{}{}] {:5.1}% {:.1}/{:.1} MB {:.1} MB/s ",
                self.label,
                "#".repeat(filled),
                "-".repeat(width - filled),
                frac * 100.0,
                mb(s.done),
                mb(s.total),
                rate
            )
        } else {
            format!("\r{} {:.1} MB {:.1} MB/s ", self.label, mb(s.done), rate)
        };
        // Pad with spaces so that a shorter line fully covers the previous one.
        let len = line.chars().count();
        let pad = " ".repeat(s.last_len.saturating_sub(len));
        s.last_len = len;
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(line.as_bytes());
        let _ = err.write_all(pad.as_bytes());
        let _ = err.flush();
    }
}

impl ProgressHandler for StderrProgress {
    fn on_progress(&self, event: &ProgressEvent) {
        if !self.tty {
            return;
        }
        let ProgressEvent::Download(event) = event else {
            return;
        };
        let Ok(mut s) = self.state.lock() else {
            return;
        };
        match event {
            DownloadEvent::Start { total_bytes, .. } => {
                s.total = *total_bytes;
                s.started = Some(Instant::now());
            }
            DownloadEvent::Progress { files } => {
                let mut complete = false;
                for f in files {
                    s.done = f.bytes_completed;
                    if f.total_bytes > 0 {
                        s.total = f.total_bytes;
                    }
                    complete |= f.status == FileStatus::Complete;
                }
                self.draw(&mut s, complete);
            }
            DownloadEvent::AggregateProgress {
                bytes_completed,
                total_bytes,
                ..
            } => {
                s.done = *bytes_completed;
                if *total_bytes > 0 {
                    s.total = *total_bytes;
                }
                self.draw(&mut s, false);
            }
            DownloadEvent::Complete => {
                if s.drawn {
                    s.done = s.done.max(s.total);
                    self.draw(&mut s, true);
                    let _ = std::io::stderr().write_all(b"\n");
                    s.drawn = false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(c: &[Candidate]) -> Vec<String> {
        c.iter().map(Candidate::describe).collect()
    }

    #[test]
    fn hub_candidates_in_resolution_order() {
        let t = zoo::get("internimage_t_1k_224").unwrap();
        let c = weight_candidates(&t.hub, "main", t.pth.as_ref());
        assert_eq!(
            order(&c),
            [
                "OpenGVLab/internimage_t_1k_224@main/model.safetensors",
                "OpenGVLab/internimage_t_1k_224@main/model.safetensors.index.json + its shards",
                "OpenGVLab/internimage_t_1k_224@main/pytorch_model.bin",
                "OpenGVLab/internimage_t_1k_224@main/pytorch_model.bin.index.json + its shards",
                "OpenGVLab/InternImage@main/internimage_t_1k_224.pth",
            ]
        );
        assert_eq!(
            c[4].url("https://huggingface.co/"),
            "https://huggingface.co/OpenGVLab/InternImage/resolve/main/internimage_t_1k_224.pth"
        );

        // A sharded manifest entry: its index first (no guessed single file), a pinned revision
        // for the per-model repository only.
        let g = zoo::get("internimage_g_jointto22k_384").unwrap();
        let c = weight_candidates(&g.hub, "abc", g.pth.as_ref());
        assert!(matches!(c[0].kind, CandidateKind::Index { .. }), "{c:?}");
        assert_eq!(c[0].revision, "abc");
        assert_eq!(c[1].entry(), PYTORCH_BIN);
        if let Some(pth) = &g.pth {
            assert_eq!(c.last().unwrap().revision, pth.revision);
        }

        // A repository that already names pytorch_model.bin does not list it twice.
        let mut r = HubRepo::safetensors("a/b");
        r.files = vec![HubFile::new(PYTORCH_BIN)];
        let c = weight_candidates(&r, "main", None);
        assert_eq!(
            order(&c),
            [
                "a/b@main/pytorch_model.bin",
                "a/b@main/pytorch_model.bin.index.json + its shards"
            ]
        );
    }
}
