//! The Hub download path end to end, against a Hugging Face Hub stand-in on 127.0.0.1 (no
//! internet): download -> cache -> load -> logits equal to the official goldens; offline mode;
//! 404 / 401 / 5xx; corrupt and truncated transfers are rejected and never cached.
#![cfg(feature = "hub")]

mod common;

use candle_core::{DType, Device, Module, Tensor};
use internimage::hub::{self, HubOptions};
use internimage::zoo::{HubFile, HubRepo};
use internimage::{Config, InternImage};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

// ---------------------------------------------------------------------------------------------
// The Hub stand-in.

#[derive(Clone)]
enum Mode {
    /// Serve the body as is.
    Good,
    /// Serve a body with flipped bytes (same length, same ETag).
    Corrupt,
    /// Announce the full Content-Length, send half, close the connection.
    Truncate,
    /// Answer every request with this status.
    Status(u16),
    /// Like the real Hub for an LFS file: `302` to an absolute CDN URL with `X-Linked-Etag`,
    /// `X-Linked-Size` and a different `ETag`; the CDN URL serves the body.
    LfsRedirect,
}

#[derive(Clone)]
struct Route {
    body: Arc<Vec<u8>>,
    etag: String,
    mode: Mode,
}

struct HubStandIn {
    port: u16,
    routes: Arc<Mutex<HashMap<String, Route>>>,
    log: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl HubStandIn {
    /// Starts the server; it stops when dropped, or by itself after two minutes.
    fn start() -> Self {
        no_proxy_for_loopback();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let routes: Arc<Mutex<HashMap<String, Route>>> = Arc::default();
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (r, l, s) = (routes.clone(), log.clone(), stop.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let live = Arc::new(AtomicUsize::new(0));
            while !s.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let (r, l, live) = (r.clone(), l.clone(), live.clone());
                        if live.fetch_add(1, Ordering::SeqCst) < 32 {
                            std::thread::spawn(move || {
                                let _ = serve(stream, &r, &l);
                                live.fetch_sub(1, Ordering::SeqCst);
                            });
                        } else {
                            live.fetch_sub(1, Ordering::SeqCst);
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Self {
            port,
            routes,
            log,
            stop,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn put(&self, repo: &str, file: &str, body: Arc<Vec<u8>>, etag: &str, mode: Mode) {
        let path = format!("/{repo}/resolve/main/{file}");
        self.routes.lock().unwrap().insert(
            path,
            Route {
                body,
                etag: etag.to_string(),
                mode,
            },
        );
    }

    fn put_path(&self, path: &str, body: Arc<Vec<u8>>) {
        self.routes.lock().unwrap().insert(
            path.to_string(),
            Route {
                body,
                etag: "cdn".to_string(),
                mode: Mode::Good,
            },
        );
    }

    fn set_mode(&self, repo: &str, file: &str, mode: Mode) {
        let path = format!("/{repo}/resolve/main/{file}");
        self.routes.lock().unwrap().get_mut(&path).unwrap().mode = mode;
    }

    fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    fn count(&self, prefix: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.starts_with(prefix))
            .count()
    }
}

impl Drop for HubStandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(
    mut stream: TcpStream,
    routes: &Mutex<HashMap<String, Route>>,
    log: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 || req.len() > 65536 {
            return Ok(());
        }
        req.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&req).to_string();
    let mut first = head.lines().next().unwrap_or("").split_whitespace();
    let method = first.next().unwrap_or("").to_string();
    let path = first.next().unwrap_or("").to_string();
    log.lock().unwrap().push(format!("{method} {path}"));
    let route = routes.lock().unwrap().get(&path).cloned();
    let is_get = method == "GET";

    let Some(route) = route else {
        let msg = b"{\"error\":\"Entry not found\"}";
        write!(
            stream,
            "HTTP/1.1 404 Not Found\r\nX-Error-Code: EntryNotFound\r\nX-Repo-Commit: {COMMIT}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            msg.len()
        )?;
        if is_get {
            stream.write_all(msg)?;
        }
        return stream.flush();
    };
    if let Mode::Status(code) = route.mode {
        let msg = format!("{{\"error\":\"status {code}\"}}");
        write!(
            stream,
            "HTTP/1.1 {code} Error\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            msg.len()
        )?;
        if is_get {
            stream.write_all(msg.as_bytes())?;
        }
        return stream.flush();
    }
    if let Mode::LfsRedirect = route.mode {
        let host = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("host: ")
                    .or_else(|| l.strip_prefix("Host: "))
            })
            .unwrap_or("127.0.0.1")
            .trim()
            .to_string();
        write!(
            stream,
            "HTTP/1.1 302 Found\r\nLocation: http://{host}/cdn/{etag}\r\nETag: W/\"0f-not-the-sha\"\r\nX-Linked-Etag: \"{etag}\"\r\nX-Linked-Size: {}\r\nX-Repo-Commit: {COMMIT}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            route.body.len(),
            etag = route.etag
        )?;
        return stream.flush();
    }
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nETag: \"{}\"\r\nX-Repo-Commit: {COMMIT}\r\nConnection: close\r\n\r\n",
        route.body.len(),
        route.etag
    )?;
    if is_get {
        match route.mode {
            Mode::Good => stream.write_all(&route.body)?,
            Mode::Corrupt => {
                let mut bad = route.body.to_vec();
                for b in bad.iter_mut().skip(1000).step_by(997) {
                    *b ^= 0x5a;
                }
                stream.write_all(&bad)?
            }
            Mode::Truncate => {
                stream.write_all(&route.body[..route.body.len() / 2])?;
                stream.flush()?;
                stream.shutdown(std::net::Shutdown::Both)?;
                return Ok(());
            }
            Mode::Status(_) | Mode::LfsRedirect => unreachable!(),
        }
    }
    stream.flush()
}

/// reqwest honours HTTP(S)_PROXY; make sure loopback requests never go through a proxy.
fn no_proxy_for_loopback() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var("NO_PROXY", "127.0.0.1,localhost");
        std::env::set_var("no_proxy", "127.0.0.1,localhost");
    });
}

// ---------------------------------------------------------------------------------------------
// Fixtures and helpers.

/// A fresh cache directory, removed when dropped.
struct TempCache(PathBuf);

impl TempCache {
    fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "internimage-hub-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempCache {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct TinyB {
    weights: Arc<Vec<u8>>,
    sha256: String,
    config_json: Arc<Vec<u8>>,
}

fn tiny_b() -> TinyB {
    let weights = std::fs::read(common::net_weights("tiny_b", "safetensors")).unwrap();
    let manifest = common::manifest();
    let sha256 = manifest["models"]["tiny_b"]["sha256"]["safetensors"]
        .as_str()
        .unwrap()
        .to_string();
    let meta = common::net_meta("tiny_b");
    let config_json = serde_json::to_vec_pretty(&meta["hf_config"]).unwrap();
    TinyB {
        weights: Arc::new(weights),
        sha256,
        config_json: Arc::new(config_json),
    }
}

/// Git-style (40-hex) ETag, as the Hub gives small non-LFS files.
const SMALL_ETAG: &str = "1111111111111111111111111111111111111111";

/// Serves the fixture's `config.json` under `repo`.
fn serve_config(server: &HubStandIn, repo: &str, t: &TinyB) {
    server.put(
        repo,
        "config.json",
        t.config_json.clone(),
        SMALL_ETAG,
        Mode::Good,
    );
}

/// Serves the fixture's `config.json` and `model.safetensors` under `repo`.
fn serve_tiny_b(server: &HubStandIn, repo: &str, t: &TinyB) {
    serve_config(server, repo, t);
    server.put(
        repo,
        "model.safetensors",
        t.weights.clone(),
        &t.sha256,
        Mode::Good,
    );
}

fn options(server: &HubStandIn, cache: &TempCache) -> HubOptions {
    HubOptions::default()
        .with_endpoint(server.endpoint())
        .with_cache_dir(&cache.0)
        .with_progress(false)
        .with_retry_max_attempts(0)
        .with_download_attempts(1)
}

/// Checks the logits of `model` on the fixture input `rand` against the official golden.
fn assert_logits_match(model: &InternImage) {
    let inputs = common::fixture_tensors("inputs.safetensors");
    let expected = common::fixture_tensors("expected/tiny_b.safetensors");
    let (atol, rtol) = common::manifest_tol(&common::manifest(), "tiny_b", "logits.rand");

    let logits = model.forward(&inputs["rand"]).unwrap();
    let reference: &Tensor = &expected["logits.rand"];
    let (worst, max_abs) = common::max_violation(&logits, reference, atol, rtol);
    assert!(
        worst <= 0.0,
        "logits vs golden: max |diff| {max_abs} (atol {atol}, rtol {rtol})"
    );
}

fn repo_folder(cache: &TempCache, repo: &str) -> PathBuf {
    cache.0.join(format!("models--{}", repo.replace('/', "--")))
}

/// Files in `blobs/` that are complete blobs (not `.incomplete` or `.lock` leftovers).
fn complete_blobs(cache: &TempCache, repo: &str) -> Vec<String> {
    let dir = repo_folder(cache, repo).join("blobs");
    let Ok(rd) = std::fs::read_dir(dir) else {
        return vec![];
    };
    rd.filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !n.ends_with(".incomplete") && !n.ends_with(".lock"))
        .collect()
}

fn snapshot_file(cache: &TempCache, repo: &str, file: &str) -> PathBuf {
    repo_folder(cache, repo)
        .join("snapshots")
        .join(COMMIT)
        .join(file)
}

/// The error of a `hub::download_repo` that must fail.
fn download_err(repo: &HubRepo, opts: &HubOptions) -> String {
    hub::download_repo(repo, opts).unwrap_err().to_string()
}

/// `InternImage::from_hub` in f32 on the CPU, which must succeed.
fn load_from_hub(repo: &HubRepo, cfg: Option<&Config>, opts: &HubOptions) -> InternImage {
    InternImage::from_hub(repo, cfg, opts, DType::F32, &Device::Cpu).unwrap()
}

/// The error of an `InternImage::from_hub` (f32, CPU) that must fail.
fn from_hub_err(repo: &HubRepo, opts: &HubOptions) -> String {
    InternImage::from_hub(repo, None, opts, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string()
}

/// The error of an `InternImage::from_pretrained_with` (f32, CPU) that must fail.
fn from_pretrained_err(name: &str, opts: &HubOptions) -> String {
    InternImage::from_pretrained_with(name, opts, DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string()
}

/// The setup most scenarios share: a Hub stand-in serving the `tiny_b` fixture
/// (`config.json` + `model.safetensors`) as `repo_id`, and a fresh cache.
struct Scenario {
    server: HubStandIn,
    cache: TempCache,
    t: TinyB,
    repo_id: &'static str,
}

impl Scenario {
    fn new(tag: &str, repo_id: &'static str) -> Self {
        let server = HubStandIn::start();
        let cache = TempCache::new(tag);
        let t = tiny_b();
        serve_tiny_b(&server, repo_id, &t);
        Self {
            server,
            cache,
            t,
            repo_id,
        }
    }

    fn repo(&self) -> HubRepo {
        HubRepo::safetensors(self.repo_id)
    }

    fn options(&self) -> HubOptions {
        options(&self.server, &self.cache)
    }

    /// The options of the failed-transfer scenarios: two download attempts.
    fn retrying_options(&self) -> HubOptions {
        self.options().with_download_attempts(2)
    }

    fn snapshot(&self, file: &str) -> PathBuf {
        snapshot_file(&self.cache, self.repo_id, file)
    }

    /// How the server answers for `model.safetensors`.
    fn set_weights_mode(&self, mode: Mode) {
        self.server
            .set_mode(self.repo_id, "model.safetensors", mode);
    }

    /// Neither the snapshot entry of `model.safetensors` nor its blob is in the cache.
    fn assert_weights_not_cached(&self) {
        let snap = self.snapshot("model.safetensors");
        assert!(
            std::fs::symlink_metadata(&snap).is_err(),
            "{} left in the cache",
            snap.display()
        );
        assert!(!complete_blobs(&self.cache, self.repo_id).contains(&self.t.sha256));
    }

    /// Serves the weights in the broken `mode`; a load with two download attempts must fail
    /// after fetching the file twice, and leave nothing in the cache. Returns the error.
    fn failed_transfer(&self, mode: Mode) -> String {
        self.set_weights_mode(mode);
        let opts = self.retrying_options();
        let err = from_hub_err(&self.repo(), &opts);
        let get = format!("GET /{}/resolve/main/model.safetensors", self.repo_id);
        assert_eq!(self.server.count(&get), 2, "{:?}", self.server.requests());
        self.assert_weights_not_cached();
        err
    }

    /// Once the server is healthy again, a load works and gives the golden logits.
    fn recovers(&self) {
        self.set_weights_mode(Mode::Good);
        let opts = self.retrying_options();
        assert_logits_match(&load_from_hub(&self.repo(), None, &opts));
    }
}

// ---------------------------------------------------------------------------------------------
// Tests.

#[test]
fn download_load_logits_then_offline_makes_no_request() {
    let s = Scenario::new("e2e", "fixtures/tiny_b");
    let (repo, opts) = (s.repo(), s.options());

    // Download + load with the repository's config.json.
    assert_logits_match(&load_from_hub(&repo, None, &opts));
    assert_eq!(
        s.server.requests(),
        [
            "HEAD /fixtures/tiny_b/resolve/main/config.json",
            "GET /fixtures/tiny_b/resolve/main/config.json",
            "HEAD /fixtures/tiny_b/resolve/main/model.safetensors",
            "GET /fixtures/tiny_b/resolve/main/model.safetensors",
        ]
    );

    // Standard Hugging Face cache layout.
    let folder = repo_folder(&s.cache, s.repo_id);
    assert_eq!(
        std::fs::read_to_string(folder.join("refs/main"))
            .unwrap()
            .trim(),
        COMMIT
    );
    let snap = s.snapshot("model.safetensors");
    assert_eq!(std::fs::read(&snap).unwrap(), *s.t.weights);
    assert!(folder.join("blobs").join(&s.t.sha256).is_file());

    // Offline: zero requests, same model.
    let before = s.server.requests().len();
    let offline = opts.clone().with_offline(true);
    let files = hub::download_repo(&repo, &offline).unwrap();
    assert_eq!(files.weights, std::slice::from_ref(&snap));
    assert_eq!(
        files.config.as_deref(),
        Some(s.snapshot("config.json").as_path())
    );
    assert!(files.index.is_none());
    let cfg = Config::from_file(files.config.as_ref().unwrap()).unwrap();
    assert_logits_match(&load_from_hub(&repo, Some(&cfg), &offline));
    // Online again: the cache is used first, still no request.
    hub::download_repo(&repo, &opts).unwrap();
    assert_eq!(
        s.server.requests().len(),
        before,
        "{:?}",
        s.server.requests()
    );
}

#[test]
fn lfs_redirect_like_the_real_hub() {
    let s = Scenario::new("lfs", "fixtures/lfs");
    s.set_weights_mode(Mode::LfsRedirect);
    s.server
        .put_path(&format!("/cdn/{}", s.t.sha256), s.t.weights.clone());

    assert_logits_match(&load_from_hub(&s.repo(), None, &s.options()));
    let cdn = format!("GET /cdn/{}", s.t.sha256);
    assert_eq!(s.server.count(&cdn), 1, "{:?}", s.server.requests());
    // The blob is named after X-Linked-Etag (the sha256), not the ETag of the redirect.
    assert!(complete_blobs(&s.cache, s.repo_id).contains(&s.t.sha256));
}

#[test]
fn pth_alternative_of_a_zoo_model() {
    let server = HubStandIn::start();
    let cache = TempCache::new("pth");
    let manifest = common::manifest();
    let sha = manifest["models"]["tiny_b"]["sha256"]["pth"]
        .as_str()
        .unwrap();
    let pth = Arc::new(std::fs::read(common::net_weights("tiny_b", "pth")).unwrap());
    // Stand the tiny fixture in for the release file of InternImage-T.
    server.put(
        "OpenGVLab/InternImage",
        "internimage_t_1k_224.pth",
        pth.clone(),
        sha,
        Mode::Good,
    );

    let hub = hub::Hub::new(options(&server, &cache)).unwrap();
    let t = internimage::zoo::get("internimage_t_1k_224").unwrap();
    let path = hub.fetch_pth(t).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), *pth);
    assert_eq!(
        server.requests(),
        [
            "HEAD /OpenGVLab/InternImage/resolve/main/internimage_t_1k_224.pth",
            "GET /OpenGVLab/InternImage/resolve/main/internimage_t_1k_224.pth",
        ]
    );
    let cfg = Config::from_json_str(std::str::from_utf8(&tiny_b().config_json).unwrap()).unwrap();
    let model = InternImage::from_checkpoint(&cfg, &path, DType::F32, &Device::Cpu).unwrap();
    assert_logits_match(&model);

    // A release file the server does not have.
    let s = internimage::zoo::get("internimage_s_1k_224").unwrap();
    let err = hub.fetch_pth(s).unwrap_err().to_string();
    assert!(
        err.contains("internimage_s_1k_224.pth") && err.contains("not found"),
        "{err}"
    );
}

#[test]
fn offline_with_empty_cache_names_the_missing_file() {
    let server = HubStandIn::start();
    let cache = TempCache::new("offline");
    let opts = options(&server, &cache).with_offline(true);

    let err = from_pretrained_err("internimage_t_1k_224", &opts);
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(err.contains("OpenGVLab/internimage_t_1k_224"), "{err}");
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    assert!(err.contains("--weights"), "{err}");

    let err = download_err(&HubRepo::safetensors("fixtures/absent"), &opts);
    assert!(
        err.contains("model.safetensors") && err.contains("offline"),
        "{err}"
    );
    assert!(server.requests().is_empty(), "{:?}", server.requests());

    // An unknown zoo name lists the known ones, before any I/O.
    let err = from_pretrained_err("internimage_z", &opts);
    assert!(err.contains("internimage_g_jointto22k_384"), "{err}");
}

#[test]
fn not_found_is_a_clear_error() {
    let server = HubStandIn::start();
    let cache = TempCache::new("404");
    let opts = options(&server, &cache);
    serve_config(&server, "fixtures/half", &tiny_b());

    // A named file that does not exist.
    let mut repo = HubRepo::safetensors("fixtures/half");
    repo.files = vec![HubFile::new("weights-v2.safetensors")];
    let err = download_err(&repo, &opts);
    assert!(
        err.contains("weights-v2.safetensors") && err.contains("not found"),
        "{err}"
    );
    assert!(err.contains("fixtures/half"), "{err}");

    // `model.safetensors` absent: the shard index is tried, then a clear error.
    let err = download_err(&HubRepo::safetensors("fixtures/half"), &opts);
    assert!(
        err.contains("model.safetensors") && err.contains("not found"),
        "{err}"
    );
    assert!(server.count("HEAD /fixtures/half/resolve/main/model.safetensors.index.json") == 1);

    // Nothing usable was cached.
    assert!(!snapshot_file(&cache, "fixtures/half", "model.safetensors").exists());
    let err = from_hub_err(&HubRepo::safetensors("fixtures/half"), &opts);
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn corrupt_body_is_rejected_and_not_cached() {
    let s = Scenario::new("corrupt", "fixtures/corrupt");
    // Restarted once, then gave up; neither the snapshot entry nor the blob is left behind.
    let err = s.failed_transfer(Mode::Corrupt);
    assert!(
        err.contains("integrity") && err.contains(&s.t.sha256),
        "{err}"
    );
    assert!(err.contains("model.safetensors"), "{err}");
    // So offline mode does not find it either.
    let err = download_err(&s.repo(), &s.retrying_options().with_offline(true));
    assert!(
        err.contains("offline") && err.contains("model.safetensors"),
        "{err}"
    );

    // Once the server is healthy, a fetch works and the file is the right one.
    s.recovers();
    let snap = s.snapshot("model.safetensors");
    assert_eq!(std::fs::read(&snap).unwrap(), *s.t.weights);
}

#[test]
fn pinned_sha256_mismatch_is_rejected() {
    let s = Scenario::new("pinned", "fixtures/pinned");
    let mut repo = s.repo();
    repo.files = vec![HubFile::new("model.safetensors").with_sha256("ab".repeat(32))];
    let err = download_err(&repo, &s.options());
    assert!(err.contains("integrity") && err.contains("pinned"), "{err}");
    s.assert_weights_not_cached();

    // The right pin passes.
    repo.files = vec![HubFile::new("model.safetensors").with_sha256(s.t.sha256.to_uppercase())];
    let files = hub::download_repo(&repo, &s.options()).unwrap();
    assert_eq!(std::fs::read(&files.weights[0]).unwrap(), *s.t.weights);
}

#[test]
fn connection_cut_mid_file_caches_nothing() {
    let s = Scenario::new("cut", "fixtures/cut");
    let err = s.failed_transfer(Mode::Truncate);
    assert!(
        err.contains("model.safetensors") && err.contains("network error"),
        "{err}"
    );
    s.recovers();
}

#[test]
fn auth_and_server_errors_are_clear() {
    let server = HubStandIn::start();
    let cache = TempCache::new("status");
    let t = tiny_b();
    // Weights-only repositories whose server answers with `code`.
    let failing = |repo_id: &str, code: u16| {
        server.put(
            repo_id,
            "model.safetensors",
            t.weights.clone(),
            &t.sha256,
            Mode::Status(code),
        );
        let mut repo = HubRepo::safetensors(repo_id);
        repo.config_file = None;
        repo
    };
    let private = failing("fixtures/private", 401);
    let down = failing("fixtures/down", 503);

    let err = download_err(&private, &options(&server, &cache));
    assert!(err.contains("401") && err.contains("HF_TOKEN"), "{err}");

    // 5xx: hf-hub retries the request (here once), then a clear error.
    let opts = options(&server, &cache).with_retry_max_attempts(1);
    let err = download_err(&down, &opts);
    assert!(err.contains("503"), "{err}");
    assert_eq!(
        server.count("HEAD /fixtures/down/"),
        2,
        "{:?}",
        server.requests()
    );
    assert!(complete_blobs(&cache, "fixtures/down").is_empty());
}

#[test]
fn sharded_checkpoint_through_the_index() {
    let server = HubStandIn::start();
    let cache = TempCache::new("shards");
    let t = tiny_b();
    let repo_id = "fixtures/sharded";
    // One shard holding every tensor, and its index; no `model.safetensors`.
    let names = common::load_safetensors(common::net_weights("tiny_b", "safetensors"))
        .into_keys()
        .collect::<Vec<_>>();
    let shard = "model-00001-of-00001.safetensors";
    let weight_map: serde_json::Map<String, serde_json::Value> = names
        .into_iter()
        .map(|n| (n, serde_json::Value::from(shard)))
        .collect();
    let index = serde_json::json!({ "metadata": { "total_size": t.weights.len() }, "weight_map": weight_map });
    serve_config(&server, repo_id, &t);
    server.put(repo_id, shard, t.weights.clone(), &t.sha256, Mode::Good);
    server.put(
        repo_id,
        hub::SAFETENSORS_INDEX,
        Arc::new(serde_json::to_vec(&index).unwrap()),
        "2222222222222222222222222222222222222222",
        Mode::Good,
    );

    // The manifest still says `model.safetensors`: the index is found as a fallback.
    let opts = options(&server, &cache);
    assert_logits_match(&load_from_hub(&HubRepo::safetensors(repo_id), None, &opts));

    // Listed explicitly, offline from the cache.
    let mut repo = HubRepo::safetensors(repo_id);
    repo.files = vec![HubFile::new(shard)];
    repo.index_file = Some(HubFile::new(hub::SAFETENSORS_INDEX));
    let before = server.requests().len();
    let files = hub::download_repo(&repo, &opts.clone().with_offline(true)).unwrap();
    assert_eq!(files.weights, [snapshot_file(&cache, repo_id, shard)]);
    assert_eq!(
        files.index,
        Some(snapshot_file(&cache, repo_id, hub::SAFETENSORS_INDEX))
    );
    assert_eq!(server.requests().len(), before);

    // A manifest that disagrees with the index is an error.
    repo.files = vec![
        HubFile::new("model-00001-of-00002.safetensors"),
        HubFile::new("model-00002-of-00002.safetensors"),
    ];
    let err = download_err(&repo, &opts);
    assert!(err.contains("shard") && err.contains(shard), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Weight fallbacks: `pytorch_model.bin`, its index, the release `.pth`.

/// CRC-32 (IEEE), as zip stores it.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A zip archive of stored (uncompressed) entries.
fn zip_stored(entries: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let (crc, len, offset) = (crc32(data), data.len() as u32, out.len() as u32);
        let common = |v: &mut Vec<u8>| {
            for x in [20u16, 0, 0, 0, 0x21] {
                v.extend_from_slice(&x.to_le_bytes()); // version, flags, method, time, date
            }
            for x in [crc, len, len] {
                v.extend_from_slice(&x.to_le_bytes());
            }
            v.extend_from_slice(&(name.len() as u16).to_le_bytes());
            v.extend_from_slice(&0u16.to_le_bytes()); // extra field length
        };
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        common(&mut out);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&20u16.to_le_bytes()); // version made by
        common(&mut central);
        for x in [0u16, 0, 0] {
            central.extend_from_slice(&x.to_le_bytes()); // comment, disk, internal attributes
        }
        central.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    for x in [0u16, 0, entries.len() as u16, entries.len() as u16] {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// A `torch.save(state_dict)` zip of f32 tensors as `transformers`' `save_pretrained(...,
/// safe_serialization=False)` writes it: a flat dict of `_rebuild_tensor_v2` (pickle protocol 2)
/// over one storage per tensor.
fn torch_zip(tensors: &[(&String, &Tensor)]) -> Vec<u8> {
    fn unicode(p: &mut Vec<u8>, s: &str) {
        p.push(b'X');
        p.extend_from_slice(&(s.len() as u32).to_le_bytes());
        p.extend_from_slice(s.as_bytes());
    }
    fn int(p: &mut Vec<u8>, v: usize) {
        p.push(b'J');
        p.extend_from_slice(&(v as i32).to_le_bytes());
    }
    fn ints(p: &mut Vec<u8>, v: &[usize]) {
        p.push(b'(');
        v.iter().for_each(|&x| int(p, x));
        p.push(b't');
    }
    let mut pkl = vec![0x80, 2, b'}', b'('];
    let mut entries = Vec::new();
    for (key, (name, t)) in tensors.iter().enumerate() {
        let dims = t.dims().to_vec();
        let mut strides = vec![1usize; dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * dims[i + 1];
        }
        let data = common::to_f32_vec(t);
        unicode(&mut pkl, name);
        pkl.extend_from_slice(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        pkl.push(b'(');
        unicode(&mut pkl, "storage");
        pkl.extend_from_slice(b"ctorch\nFloatStorage\n");
        unicode(&mut pkl, &key.to_string());
        unicode(&mut pkl, "cpu");
        int(&mut pkl, data.len());
        pkl.extend_from_slice(b"tQ"); // the storage tuple, as a persistent id
        int(&mut pkl, 0); // storage offset
        ints(&mut pkl, &dims);
        ints(&mut pkl, &strides);
        pkl.push(0x89); // requires_grad = False
        pkl.extend_from_slice(b"ccollections\nOrderedDict\n)R"); // backward hooks
        pkl.extend_from_slice(b"tR");
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        entries.push((format!("archive/data/{key}"), bytes));
    }
    pkl.extend_from_slice(b"u.");
    entries.insert(0, ("archive/data.pkl".to_string(), pkl));
    zip_stored(&entries)
}

/// The tensors of the tiny_b fixture in the Hugging Face layout (`model.` prefix,
/// `layer_scale1/2`), sorted by name.
fn tiny_b_hf_tensors() -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> =
        common::load_safetensors(common::net_weights("tiny_b", "safetensors"))
            .into_iter()
            .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(v.iter().all(|(n, _)| n.starts_with("model.")));
    v
}

/// Serves `body` as `file` of `repo` with its SHA-256 as ETag (as the Hub does for LFS files).
fn serve_lfs(server: &HubStandIn, repo: &str, file: &str, body: Vec<u8>) -> Arc<Vec<u8>> {
    let sha: String = sha2_hex(&body);
    let body = Arc::new(body);
    server.put(repo, file, body.clone(), &sha, Mode::Good);
    body
}

fn sha2_hex(data: &[u8]) -> String {
    let dir = TempCache::new("sha");
    let path = dir.0.join("f");
    std::fs::write(&path, data).unwrap();
    hub::sha256_file(&path).unwrap().0
}

const T_REPO: &str = "OpenGVLab/internimage_t_1k_224";
const PTH_REPO: &str = "OpenGVLab/InternImage";

/// The zoo entry of InternImage-T, whose repositories the tiny_b fixture stands in for.
fn t_entry() -> &'static internimage::zoo::PretrainedModel {
    internimage::zoo::get("internimage_t_1k_224").unwrap()
}

/// What `from_pretrained("internimage_t_1k_224")` does (its repo, its `.pth` fallback), with
/// the tiny_b architecture the fixture weights need.
fn load_t_like_from_pretrained(opts: &HubOptions) -> candle_core::Result<InternImage> {
    let t = t_entry();
    let cfg = common::net_config("tiny_b");
    InternImage::from_hub_with(
        &t.hub,
        t.pth.as_ref(),
        Some(&cfg),
        opts,
        DType::F32,
        &Device::Cpu,
    )
}

fn head(repo: &str, file: &str) -> String {
    format!("HEAD /{repo}/resolve/main/{file}")
}

fn get(repo: &str, file: &str) -> String {
    format!("GET /{repo}/resolve/main/{file}")
}

/// The requests of a first online resolution up to (and including) `file`, when every
/// candidate before it is a 404 (`config`: the per-model repo has a `config.json`).
fn probes_before(config: bool) -> Vec<String> {
    let mut v = vec![head(T_REPO, "config.json")];
    if config {
        v.push(get(T_REPO, "config.json"));
    }
    v.push(head(T_REPO, "model.safetensors"));
    v.push(head(T_REPO, "model.safetensors.index.json"));
    v
}

/// A second, offline resolution makes no request, finds `weights` in the cache and gives the
/// golden logits.
fn offline_again(server: &HubStandIn, opts: &HubOptions, weights: &[PathBuf]) {
    let before = server.requests().len();
    let offline = opts.clone().with_offline(true);
    let files = hub::Hub::new(offline.clone())
        .unwrap()
        .fetch_model("internimage_t_1k_224")
        .unwrap();
    assert_eq!(files.weights, weights);
    assert_logits_match(&load_t_like_from_pretrained(&offline).unwrap());
    // Online again: the cached fallback is found first, no request for the weights.
    hub::Hub::new(opts.clone())
        .unwrap()
        .fetch_model("internimage_t_1k_224")
        .unwrap();
    let after: Vec<String> = server.requests()[before..].to_vec();
    assert!(
        after.iter().all(|r| r.ends_with("/config.json")),
        "{after:?}"
    );
}

#[test]
fn fallback_a_pytorch_model_bin_only() {
    let server = HubStandIn::start();
    let cache = TempCache::new("bin");
    let t = tiny_b();
    serve_config(&server, T_REPO, &t);
    let tensors = tiny_b_hf_tensors();
    let refs: Vec<_> = tensors.iter().map(|(n, t)| (n, t)).collect();
    let bin = serve_lfs(&server, T_REPO, "pytorch_model.bin", torch_zip(&refs));
    let opts = options(&server, &cache);

    assert_logits_match(&load_t_like_from_pretrained(&opts).unwrap());
    let mut want = probes_before(true);
    want.push(head(T_REPO, "pytorch_model.bin"));
    want.push(get(T_REPO, "pytorch_model.bin"));
    assert_eq!(server.requests(), want);

    // Cached in the standard layout, and found again offline.
    let snap = snapshot_file(&cache, T_REPO, "pytorch_model.bin");
    assert_eq!(std::fs::read(&snap).unwrap(), *bin);
    assert_eq!(
        std::fs::read_to_string(repo_folder(&cache, T_REPO).join("refs/main"))
            .unwrap()
            .trim(),
        COMMIT
    );
    offline_again(&server, &opts, &[snap]);
}

#[test]
fn fallback_b_pytorch_model_bin_index_and_two_shards() {
    let server = HubStandIn::start();
    let cache = TempCache::new("binshards");
    let t = tiny_b();
    serve_config(&server, T_REPO, &t);
    let tensors = tiny_b_hf_tensors();
    let half = tensors.len() / 2;
    let shard_names = [
        "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin",
    ];
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [&tensors[..half], &tensors[half..]].into_iter().enumerate() {
        let refs: Vec<_> = part.iter().map(|(n, t)| (n, t)).collect();
        serve_lfs(&server, T_REPO, shard_names[i], torch_zip(&refs));
        for (n, _) in part {
            weight_map.insert(n.clone(), shard_names[i].into());
        }
    }
    let index = serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": weight_map });
    server.put(
        T_REPO,
        hub::PYTORCH_BIN_INDEX,
        Arc::new(serde_json::to_vec(&index).unwrap()),
        "3333333333333333333333333333333333333333", // not config.json's
        Mode::Good,
    );
    let opts = options(&server, &cache);

    assert_logits_match(&load_t_like_from_pretrained(&opts).unwrap());
    let mut want = probes_before(true);
    want.push(head(T_REPO, "pytorch_model.bin"));
    for f in [hub::PYTORCH_BIN_INDEX, shard_names[0], shard_names[1]] {
        want.push(head(T_REPO, f));
        want.push(get(T_REPO, f));
    }
    assert_eq!(server.requests(), want);

    let shards: Vec<PathBuf> = shard_names
        .iter()
        .map(|f| snapshot_file(&cache, T_REPO, f))
        .collect();
    // The index itself also loads as a local checkpoint (it names PyTorch shards).
    let index_path = snapshot_file(&cache, T_REPO, hub::PYTORCH_BIN_INDEX);
    let cfg = common::net_config("tiny_b");
    let model = InternImage::from_checkpoint(&cfg, &index_path, DType::F32, &Device::Cpu).unwrap();
    assert_logits_match(&model);
    let files = hub::Hub::new(opts.clone().with_offline(true))
        .unwrap()
        .fetch_model("internimage_t_1k_224")
        .unwrap();
    assert_eq!(files.index, Some(index_path));
    offline_again(&server, &opts, &shards);
}

#[test]
fn fallback_c_release_pth_when_the_model_repo_has_no_weights() {
    let server = HubStandIn::start();
    let cache = TempCache::new("relpth");
    // No config.json either (as OpenGVLab/DCNv4): the given architecture is used.
    let pth = std::fs::read(common::net_weights("tiny_b", "pth")).unwrap();
    let pth = serve_lfs(&server, PTH_REPO, "internimage_t_1k_224.pth", pth);
    let opts = options(&server, &cache);

    assert_logits_match(&load_t_like_from_pretrained(&opts).unwrap());
    let mut want = probes_before(false);
    want.push(head(T_REPO, "pytorch_model.bin"));
    want.push(head(T_REPO, "pytorch_model.bin.index.json"));
    want.push(head(PTH_REPO, "internimage_t_1k_224.pth"));
    want.push(get(PTH_REPO, "internimage_t_1k_224.pth"));
    assert_eq!(server.requests(), want);

    let snap = snapshot_file(&cache, PTH_REPO, "internimage_t_1k_224.pth");
    assert_eq!(std::fs::read(&snap).unwrap(), *pth);
    offline_again(&server, &opts, &[snap]);

    // Without the fallback (a bare repository), the same Hub has no weights.
    let err = download_err(&t_entry().hub, &opts);
    assert!(
        err.contains("no weights") && !err.contains(PTH_REPO),
        "{err}"
    );
}

#[test]
fn fallback_d_no_candidate_names_every_url() {
    let server = HubStandIn::start();
    let cache = TempCache::new("nothing");
    let opts = options(&server, &cache);
    let ep = server.endpoint();

    let err = from_pretrained_err("internimage_t_1k_224", &opts);
    let urls = [
        format!("{ep}/{T_REPO}/resolve/main/model.safetensors"),
        format!("{ep}/{T_REPO}/resolve/main/model.safetensors.index.json"),
        format!("{ep}/{T_REPO}/resolve/main/pytorch_model.bin"),
        format!("{ep}/{T_REPO}/resolve/main/pytorch_model.bin.index.json"),
        format!("{ep}/{PTH_REPO}/resolve/main/internimage_t_1k_224.pth"),
    ];
    let mut at = 0;
    for url in &urls {
        let pos = err[at..]
            .find(url.as_str())
            .unwrap_or_else(|| panic!("{url} (in order) missing from: {err}"));
        at += pos + url.len();
    }
    assert!(err.contains("not found") && err.contains("404"), "{err}");
    assert!(
        err.contains("--weights") && err.contains("from_checkpoint_files"),
        "{err}"
    );
    let mut want = vec![head(T_REPO, "config.json")];
    want.extend(urls.iter().map(|u| format!("HEAD {}", &u[ep.len()..])));
    assert_eq!(server.requests(), want);

    // Offline: no request, and the error lists what it looked for, in order.
    let err = from_pretrained_err("internimage_t_1k_224", &opts.clone().with_offline(true));
    assert_eq!(
        server.requests().len(),
        want.len(),
        "{:?}",
        server.requests()
    );
    let looked = [
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
        "internimage_t_1k_224.pth",
    ];
    let mut at = 0;
    for name in looked {
        let pos = err[at..]
            .find(name)
            .unwrap_or_else(|| panic!("{name} (in order) missing from: {err}"));
        at += pos + name.len();
    }
    assert!(
        err.contains("offline") && err.contains("--weights"),
        "{err}"
    );
}

#[test]
fn only_not_found_falls_back() {
    let server = HubStandIn::start();
    let cache = TempCache::new("nofall");
    let t = tiny_b();
    let tensors = tiny_b_hf_tensors();
    let refs: Vec<_> = tensors.iter().map(|(n, t)| (n, t)).collect();
    serve_lfs(&server, T_REPO, "pytorch_model.bin", torch_zip(&refs));
    let bin_requests = || server.count(&head(T_REPO, "pytorch_model.bin"));

    for (mode, expect) in [
        (Mode::Status(403), "403"),
        (Mode::Status(401), "401"),
        (Mode::Status(503), "503"),
        (Mode::Corrupt, "integrity"),
        (Mode::Truncate, "network error"),
    ] {
        server.put(
            T_REPO,
            "model.safetensors",
            t.weights.clone(),
            &t.sha256,
            mode,
        );
        let err = load_t_like_from_pretrained(&options(&server, &cache))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains(expect) && err.contains("model.safetensors"),
            "{expect}: {err}"
        );
        assert_eq!(bin_requests(), 0, "{expect}: {:?}", server.requests());
    }
}

#[test]
fn flash_checkpoint_from_the_dcnv4_repo() {
    // A stand-in `OpenGVLab/DCNv4` repository: raw `.pth` files, no config.json.
    let server = HubStandIn::start();
    let cache = TempCache::new("flash");
    let src = common::fixtures().join("flash/weights/tiny_flash_s.pth");
    let pth = Arc::new(std::fs::read(&src).unwrap());
    let (sha, _) = hub::sha256_file(&src).unwrap();
    // Stand the tiny fixture in for the release file of FlashInternImage-T.
    let file = "flash_intern_image_t_1k_224.pth";
    server.put("OpenGVLab/DCNv4", file, pth.clone(), &sha, Mode::Good);

    let entry = internimage::zoo::get("flash_internimage_t_1k_224").unwrap();
    assert_eq!(entry.hub.repo, "OpenGVLab/DCNv4");
    assert!(entry.hub.config_file.is_none());
    let hub = hub::Hub::new(options(&server, &cache)).unwrap();
    let files = hub.fetch_model("flash_internimage_t_1k_224").unwrap();
    assert_eq!(files.config, None);
    assert_eq!(files.weights.len(), 1);
    assert_eq!(std::fs::read(&files.weights[0]).unwrap(), *pth);
    assert_eq!(
        server.requests(),
        [
            format!("HEAD /OpenGVLab/DCNv4/resolve/main/{file}"),
            format!("GET /OpenGVLab/DCNv4/resolve/main/{file}"),
        ]
    );

    // The tiny network's architecture loads the downloaded file; logits equal the golden.
    let meta = common::read_json(common::fixtures().join("flash/weights/tiny_flash_s.json"));
    let cfg = Config::from_json_str(&meta["hf_config"].to_string()).unwrap();
    let model =
        InternImage::from_checkpoint(&cfg, &files.weights[0], DType::F32, &Device::Cpu).unwrap();
    let inputs = common::fixture_tensors("inputs.safetensors");
    let expected = common::load_safetensors(
        common::fixtures().join("flash/expected/tiny_flash_s.safetensors"),
    );
    let flash_manifest = common::read_json(common::fixtures().join("flash/manifest.json"));
    let (atol, rtol) = common::manifest_tol(&flash_manifest, "tiny_flash_s", "logits.rand");
    let logits = model.forward(&inputs["rand"]).unwrap();
    let (worst, max_abs) = common::max_violation(&logits, &expected["logits.rand"], atol, rtol);
    assert!(worst <= 0.0, "logits vs golden: max |diff| {max_abs}");

    // `from_pretrained` takes the architecture from the preset (no config.json to read): the
    // FlashInternImage-T preset does not fit the tiny stand-in, and the error says so.
    let err = from_pretrained_err("flash_internimage_t_1k_224", &options(&server, &cache));
    assert!(err.contains("shape mismatch"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Typed errors: each failure is an `internimage::Error` variant a caller can match.

/// `matches!` on the typed error inside a `candle_core::Error`.
macro_rules! assert_typed {
    ($err:expr, $pat:pat $(if $guard:expr)?) => {{
        let err = &$err;
        assert!(
            matches!(internimage::Error::find(err), Some($pat) $(if $guard)?),
            "{err:?}"
        );
    }};
}

#[test]
fn typed_error_offline_not_cached() {
    let server = HubStandIn::start();
    let cache = TempCache::new("typed-offline");
    let opts = options(&server, &cache).with_offline(true);
    let err =
        InternImage::from_pretrained_with("internimage_t_1k_224", &opts, DType::F32, &Device::Cpu)
            .err()
            .unwrap();
    assert_typed!(
        err,
        internimage::Error::OfflineNotCached { repo, file, .. }
            if repo == "OpenGVLab/internimage_t_1k_224" && file.contains("model.safetensors")
    );
    let err = hub::Hub::new(opts)
        .unwrap()
        .fetch_file(
            "fixtures/absent",
            "main",
            &HubFile::new("model.safetensors"),
        )
        .unwrap_err();
    assert_typed!(
        err,
        internimage::Error::OfflineNotCached { repo, file, .. }
            if repo == "fixtures/absent" && file == "model.safetensors"
    );
    assert!(server.requests().is_empty(), "{:?}", server.requests());
}

#[test]
fn typed_error_hub_not_found() {
    let server = HubStandIn::start();
    let cache = TempCache::new("typed-404");
    let opts = options(&server, &cache);
    serve_config(&server, "fixtures/half", &tiny_b());
    let mut repo = HubRepo::safetensors("fixtures/half");
    repo.files = vec![HubFile::new("weights-v2.safetensors")];
    let err = hub::download_repo(&repo, &opts).unwrap_err();
    assert_typed!(
        err,
        internimage::Error::HubNotFound { repo, file, .. }
            if repo == "fixtures/half" && file.contains("weights-v2.safetensors")
    );
    // One named file: the Hub's 404 for it.
    let err = hub::Hub::new(opts)
        .unwrap()
        .fetch_pth(internimage::zoo::get("internimage_t_1k_224").unwrap())
        .unwrap_err();
    assert_typed!(err, internimage::Error::HubNotFound { .. });
}

#[test]
fn typed_error_unauthorized() {
    let server = HubStandIn::start();
    let cache = TempCache::new("typed-401");
    let t = tiny_b();
    for (repo_id, code) in [("fixtures/private", 401u16), ("fixtures/gated", 403)] {
        server.put(
            repo_id,
            "model.safetensors",
            t.weights.clone(),
            &t.sha256,
            Mode::Status(code),
        );
        let mut repo = HubRepo::safetensors(repo_id);
        repo.config_file = None;
        let err = hub::download_repo(&repo, &options(&server, &cache)).unwrap_err();
        assert_typed!(
            err,
            internimage::Error::Unauthorized { repo, status, .. }
                if repo == repo_id && *status == code
        );
    }
}

#[test]
fn typed_error_network() {
    // A server failure (503) after retries.
    let server = HubStandIn::start();
    let cache = TempCache::new("typed-503");
    let t = tiny_b();
    server.put(
        "fixtures/down",
        "model.safetensors",
        t.weights.clone(),
        &t.sha256,
        Mode::Status(503),
    );
    let mut repo = HubRepo::safetensors("fixtures/down");
    repo.config_file = None;
    let err = hub::download_repo(&repo, &options(&server, &cache)).unwrap_err();
    assert_typed!(
        err,
        internimage::Error::Network { status: Some(503), repo, .. } if repo == "fixtures/down"
    );
    // A connection cut mid-file.
    let s = Scenario::new("typed-cut", "fixtures/typed-cut");
    s.set_weights_mode(Mode::Truncate);
    let err = hub::download_repo(&s.repo(), &s.options()).unwrap_err();
    assert_typed!(err, internimage::Error::Network { status: None, .. });
}

#[test]
fn typed_error_integrity_mismatch() {
    let s = Scenario::new("typed-pinned", "fixtures/typed-pinned");
    let mut repo = s.repo();
    repo.files = vec![HubFile::new("model.safetensors").with_sha256("ab".repeat(32))];
    let err = hub::download_repo(&repo, &s.options()).unwrap_err();
    assert_typed!(
        err,
        internimage::Error::IntegrityMismatch { repo, file, .. }
            if repo == "fixtures/typed-pinned" && file == "model.safetensors"
    );
    // A corrupt body (the Hub's ETag does not match), through `InternImage::from_hub`.
    s.set_weights_mode(Mode::Corrupt);
    let err = InternImage::from_hub(&s.repo(), None, &s.options(), DType::F32, &Device::Cpu)
        .err()
        .unwrap();
    assert_typed!(err, internimage::Error::IntegrityMismatch { .. });
}
