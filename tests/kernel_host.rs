//! The GPU kernels' per-element code, compiled for the host and checked without a GPU.
//!
//! `kernels/dcnv3_host.cpp` includes `kernels/dcnv3_common.h` (the code that the CUDA kernels in
//! `kernels/dcnv3.cu` and the Metal kernels in `kernels/dcnv3.metal` run) through
//! `kernels/host_shim.h`, and emulates the GPU launches (thread by thread; the backward's warp
//! shuffles by a 32-lane butterfly). This test builds it with the `cc` crate into a temporary
//! directory, runs it on every case of `../shared/fixtures/dcnv3_ops.*` with every vector width
//! and several lane counts, with parameter blocks produced by the launchers' own Rust code
//! (`internimage::ops::dcnv3::launch`), and compares forward outputs and the backward gradients
//! with the golden values (fixture tolerances) and with the CPU op.

mod common;

use candle_core::Tensor;
use internimage::ops::dcnv3::launch::{bwd_lanes, fwd_lanes, vec_widths, Dcnv3Params};
use internimage::ops::dcnv3::{dcnv3, dcnv3_backward};
use internimage::Dcnv3Config;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const KERNELS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels");

fn scratch_dir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("internimage-kernel-host-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Compiles `kernels/<src>` (C++17, with `-I kernels` and `extra_includes`) into an executable.
fn build_runner(
    src: &str,
    exe_name: &str,
    extra_includes: &[&str],
    extra_flags: &[&str],
) -> PathBuf {
    let dir = scratch_dir();
    let exe = dir.join(exe_name);
    let compiler = cc::Build::new()
        .cpp(true)
        .target(env!("INTERNIMAGE_TARGET"))
        .host(env!("INTERNIMAGE_HOST"))
        .opt_level(2)
        .debug(false)
        .cargo_metadata(false)
        .out_dir(&dir)
        .try_get_compiler()
        .expect("a C++ compiler for the host build of the kernels (cc crate)");
    let mut cmd = compiler.to_command();
    cmd.arg("-std=c++17").arg(format!("-I{KERNELS}"));
    for inc in extra_includes {
        cmd.arg(format!("-I{KERNELS}/{inc}"));
    }
    cmd.args(extra_flags)
        .arg("-x")
        .arg("c++")
        .arg(format!("{KERNELS}/{src}"))
        .arg("-o")
        .arg(&exe);
    let out = cmd.output().expect("running the C++ compiler");
    assert!(
        out.status.success(),
        "compiling kernels/{src} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// The host build of `dcnv3_common.h` (what the CUDA kernels run), built once per process.
fn runner() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| build_runner("dcnv3_host.cpp", "dcnv3_host", &[], &["-Wall"]))
}

/// `kernels/dcnv3.metal` itself compiled as C++ (through the stand-in `host_metal/metal_stdlib`):
/// the Metal kernels' entry points run on the host (f32; backward with lanes == 1).
fn metal_runner() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        build_runner(
            "dcnv3_metal_host.cpp",
            "dcnv3_metal_host",
            &["host_metal"],
            &["-w"],
        )
    })
}

struct Case {
    name: String,
    cfg: Dcnv3Config,
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    grad_weight: Option<Tensor>,
    expected: HashMap<String, Tensor>,
}

struct Fixtures {
    cases: Vec<Case>,
    tol_out: (f32, f32),
    tol_grad: (f32, f32),
}

fn fixtures() -> Fixtures {
    let (json, tensors) = common::dcnv3_fixtures(common::FIXTURES);
    let get = |k: &str| -> Tensor {
        tensors
            .get(k)
            .unwrap_or_else(|| panic!("fixture tensor {k} missing"))
            .clone()
    };
    let mut cases = Vec::new();
    for c in json["cases"].as_array().unwrap() {
        let cfg = common::dcnv3_config(c);
        let t = &c["tensors"];
        let mut expected = HashMap::new();
        for (k, v) in c["expected"].as_object().unwrap() {
            expected.insert(k.clone(), get(v.as_str().unwrap()));
        }
        cases.push(Case {
            name: c["name"].as_str().unwrap().to_string(),
            cfg,
            input: get(t["input"].as_str().unwrap()),
            offset: get(t["offset"].as_str().unwrap()),
            mask: get(t["mask"].as_str().unwrap()),
            grad_weight: t.get("grad_weight").map(|v| get(v.as_str().unwrap())),
            expected,
        });
    }
    Fixtures {
        cases,
        tol_out: common::atol_rtol_f32(&json["tolerances"]["out"]),
        tol_grad: common::atol_rtol_f32(&json["tolerances"]["grads"]),
    }
}

fn write_f32(path: &Path, v: &[f32]) {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

fn read_f32(path: &Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap();
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Fails with every collected message when `failures` is not empty.
fn assert_no_failures(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Runs the host build: writes the tensors and the parameter block, returns the outputs.
fn run_host(
    exe: &Path,
    case: &Case,
    mode: &str,
    vec: usize,
    lanes: usize,
    grad_out: Option<&[f32]>,
) -> HashMap<&'static str, Vec<f32>> {
    let g = case
        .cfg
        .geometry(case.input.shape(), case.offset.shape(), case.mask.shape())
        .unwrap();
    let params = Dcnv3Params::new(&case.cfg, &g, lanes).unwrap();
    let args = [&case.input, &case.offset, &case.mask].map(common::to_f32_vec);
    run_host_raw(exe, &case.name, &params, mode, vec, &args, grad_out)
}

/// [`run_host`] on raw values: `args` = input, offset buffer, mask buffer (laid out as the
/// parameters' point layout says).
fn run_host_raw(
    exe: &Path,
    name: &str,
    params: &Dcnv3Params,
    mode: &str,
    vec: usize,
    args: &[Vec<f32>; 3],
    grad_out: Option<&[f32]>,
) -> HashMap<&'static str, Vec<f32>> {
    let lanes = params.lanes;
    let tag = exe.file_name().unwrap().to_string_lossy().to_string();
    let dir = scratch_dir().join(format!("{tag}-{name}-{mode}-v{vec}-l{lanes}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("params.bin"), params.to_le_bytes()).unwrap();
    write_f32(&dir.join("input.bin"), &args[0]);
    write_f32(&dir.join("offset.bin"), &args[1]);
    write_f32(&dir.join("mask.bin"), &args[2]);
    if let Some(go) = grad_out {
        write_f32(&dir.join("grad_out.bin"), go);
    }
    let out = Command::new(exe)
        .arg(mode)
        .arg(&dir)
        .arg(vec.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "host kernel {mode} failed for {name} (vec {vec}, lanes {lanes}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: &[&'static str] = if mode == "fwd" {
        &["out"]
    } else {
        &["grad_input", "grad_offset", "grad_mask"]
    };
    let res = names
        .iter()
        .map(|&n| (n, read_f32(&dir.join(format!("{n}.bin")))))
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    res
}

/// (vec, lanes) launch shapes to try: what the launchers pick plus smaller lane counts, so that
/// the channel-chunk loop (a thread handling several chunks) is exercised as well.
fn fwd_shapes(cg: usize) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for &vec in vec_widths(2) {
        if cg.is_multiple_of(vec) {
            let l = fwd_lanes(cg, vec);
            for lanes in [l, 1, 3] {
                if lanes <= l && !v.contains(&(vec, lanes)) {
                    v.push((vec, lanes));
                }
            }
        }
    }
    v
}

fn bwd_shapes(cg: usize) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for &vec in vec_widths(2) {
        if cg.is_multiple_of(vec) {
            let l = bwd_lanes(cg, vec, 32);
            for lanes in [l, 1, 2] {
                if lanes <= l && !v.contains(&(vec, lanes)) {
                    v.push((vec, lanes));
                }
            }
        }
    }
    v
}

#[test]
fn host_kernel_forward_matches_fixtures_and_cpu_op() {
    let fx = fixtures();
    assert!(fx.cases.len() >= 20, "expected the 21 fixture cases");
    let mut failures = Vec::new();
    let mut runs = 0;
    for case in &fx.cases {
        let want = common::to_f32_vec(&case.expected["out"]);
        let cpu =
            common::to_f32_vec(&dcnv3(&case.input, &case.offset, &case.mask, &case.cfg).unwrap());
        for (vec, lanes) in fwd_shapes(case.cfg.group_channels) {
            let got = run_host(runner(), case, "fwd", vec, lanes, None);
            runs += 1;
            let tag = format!("{} fwd vec {vec} lanes {lanes}", case.name);
            for (what, reference) in [("golden", &want), ("cpu op", &cpu)] {
                if let Err(e) = common::check_f32(
                    &format!("{tag} vs {what}"),
                    &got["out"],
                    reference,
                    fx.tol_out,
                ) {
                    failures.push(e);
                }
            }
        }
    }
    assert_no_failures(&failures);
    assert!(runs >= 40, "only {runs} runs");
}

#[test]
fn host_kernel_backward_matches_fixtures_and_cpu_op() {
    let fx = fixtures();
    let mut failures = Vec::new();
    let mut cases = 0;
    for case in &fx.cases {
        let Some(gw) = &case.grad_weight else {
            continue;
        };
        cases += 1;
        let go = common::to_f32_vec(gw);
        let (ci, co, cm) =
            dcnv3_backward(&case.input, &case.offset, &case.mask, gw, &case.cfg).unwrap();
        let cpu = [
            common::to_f32_vec(&ci),
            common::to_f32_vec(&co),
            common::to_f32_vec(&cm),
        ];
        for (vec, lanes) in bwd_shapes(case.cfg.group_channels) {
            let got = run_host(runner(), case, "bwd", vec, lanes, Some(&go));
            let tag = format!("{} bwd vec {vec} lanes {lanes}", case.name);
            for (k, name) in ["grad_input", "grad_offset", "grad_mask"]
                .iter()
                .enumerate()
            {
                let want = common::to_f32_vec(&case.expected[*name]);
                if let Err(e) = common::check_f32(
                    &format!("{tag} {name} vs golden"),
                    &got[name],
                    &want,
                    fx.tol_grad,
                ) {
                    failures.push(e);
                }
                if let Err(e) = common::check_f32(
                    &format!("{tag} {name} vs cpu op"),
                    &got[name],
                    &cpu[k],
                    fx.tol_grad,
                ) {
                    failures.push(e);
                }
            }
        }
    }
    assert_eq!(cases, 9, "the fixtures hold 9 gradient cases");
    assert_no_failures(&failures);
}

/// The Metal kernels (`kernels/dcnv3.metal`, compiled as C++ on the host) against the goldens:
/// forward with the f32 vector widths and the launcher's lanes, backward with lanes == 1.
#[test]
fn host_metal_kernels_match_fixtures() {
    let fx = fixtures();
    let metal = std::fs::read_to_string(format!("{KERNELS}/dcnv3.metal")).unwrap();
    assert_eq!(
        metal.matches("#include \"dcnv3_common.h\"").count(),
        1,
        "src/ops/dcnv3/metal.rs pastes the shared header over exactly one #include line"
    );
    let mut failures = Vec::new();
    for case in &fx.cases {
        let cg = case.cfg.group_channels;
        for &vec in vec_widths(4) {
            if !cg.is_multiple_of(vec) {
                continue;
            }
            let got = run_host(metal_runner(), case, "fwd", vec, fwd_lanes(cg, vec), None);
            if let Err(e) = common::check_f32(
                &format!("{} metal fwd vec {vec}", case.name),
                &got["out"],
                &common::to_f32_vec(&case.expected["out"]),
                fx.tol_out,
            ) {
                failures.push(e);
            }
            if let Some(gw) = &case.grad_weight {
                let got = run_host(
                    metal_runner(),
                    case,
                    "bwd",
                    vec,
                    1,
                    Some(&common::to_f32_vec(gw)),
                );
                for name in ["grad_input", "grad_offset", "grad_mask"] {
                    if let Err(e) = common::check_f32(
                        &format!("{} metal bwd vec {vec} {name}", case.name),
                        &got[name],
                        &common::to_f32_vec(&case.expected[name]),
                        fx.tol_grad,
                    ) {
                        failures.push(e);
                    }
                }
            }
        }
    }
    assert_no_failures(&failures);
}

/// The DCNv4 cases of `../shared/fixtures/flash/dcnv4_ops.*`: (name, config, input,
/// offset_mask, grad_weight, expected tensors, (out tol), (grad tol)).
struct V4Case {
    name: String,
    cfg: Dcnv3Config,
    input: Tensor,
    om: Tensor,
    grad_weight: Option<Tensor>,
    out: Tensor,
    grads: Option<(Tensor, Tensor)>,
    tol: (f32, f32),
    grad_tol: (f32, f32),
}

fn dcnv4_cases() -> Vec<V4Case> {
    let (cases, t) = common::dcnv4_fixtures();
    let f32s = |(a, r): (f64, f64)| (a as f32, r as f32);
    cases
        .into_iter()
        .map(|c| {
            let get = |k: &str| t[&format!("{}.{k}", c.name)].clone();
            let has = c.has_grads;
            V4Case {
                cfg: c.cfg,
                input: get("input"),
                om: get("offset_mask"),
                grad_weight: has.then(|| get("grad_weight")),
                out: get("out"),
                grads: has.then(|| (get("grad_input"), get("grad_offset_mask"))),
                tol: f32s(c.tol),
                grad_tol: f32s(c.grad_tol),
                name: c.name,
            }
        })
        .collect()
}

/// DCNv4 through the GPU kernels' per-element code (the CUDA build and the Metal source, both
/// on the host): the packed layout of `Dcnv3Params::new_dcnv4`, offset_mask passed as both the
/// offset and the mask buffer, against the goldens and the CPU op; gradients (offset columns
/// from grad_offset, mask columns from grad_mask, padding zero) against the golden
/// grad_offset_mask.
#[test]
fn host_kernels_dcnv4_match_fixtures_and_cpu_op() {
    use internimage::ops::dcnv4::{dcnv4, dcnv4_backward};
    let mut failures = Vec::new();
    let mut runs = 0;
    for case in dcnv4_cases() {
        let g = internimage::ops::dcnv4::geometry(&case.cfg, case.input.shape(), case.om.shape())
            .unwrap();
        let cg = case.cfg.group_channels;
        let om = common::to_f32_vec(&case.om);
        let args = [common::to_f32_vec(&case.input), om.clone(), om.clone()];
        let cpu = common::to_f32_vec(&dcnv4(&case.input, &case.om, &case.cfg).unwrap());
        let want = common::to_f32_vec(&case.out);
        for (exe, shapes) in [
            (runner(), fwd_shapes(cg)),
            (
                metal_runner(),
                vec_widths(4)
                    .iter()
                    .filter(|&&v| cg.is_multiple_of(v))
                    .map(|&v| (v, fwd_lanes(cg, v)))
                    .collect(),
            ),
        ] {
            for (vec, lanes) in shapes {
                let params = Dcnv3Params::new_dcnv4(&case.cfg, &g, lanes).unwrap();
                // A scratch-directory name of its own (the DCNv3 tests run concurrently).
                let name = format!("dcnv4_{}", case.name);
                let got = run_host_raw(exe, &name, &params, "fwd", vec, &args, None);
                runs += 1;
                let tag = format!("dcnv4 {} fwd vec {vec} lanes {lanes}", case.name);
                for (what, reference) in [("golden", &want), ("cpu op", &cpu)] {
                    if let Err(e) = common::check_f32(
                        &format!("{tag} vs {what}"),
                        &got["out"],
                        reference,
                        case.tol,
                    ) {
                        failures.push(e);
                    }
                }
            }
        }
        let (Some(gw), Some((gi_ref, gom_ref))) = (&case.grad_weight, &case.grads) else {
            continue;
        };
        let go = common::to_f32_vec(gw);
        let (ci, com) = dcnv4_backward(&case.input, &case.om, gw, &case.cfg).unwrap();
        let (ci, com) = (common::to_f32_vec(&ci), common::to_f32_vec(&com));
        let (gi_ref, gom_ref) = (common::to_f32_vec(gi_ref), common::to_f32_vec(gom_ref));
        let metal_bwd: Vec<(usize, usize)> = vec_widths(4)
            .iter()
            .filter(|&&v| cg.is_multiple_of(v))
            .map(|&v| (v, 1))
            .collect();
        for (exe, shapes) in [(runner(), bwd_shapes(cg)), (metal_runner(), metal_bwd)] {
            for (vec, lanes) in shapes {
                let params = Dcnv3Params::new_dcnv4(&case.cfg, &g, lanes).unwrap();
                let name = format!("dcnv4_{}", case.name);
                let got = run_host_raw(exe, &name, &params, "bwd", vec, &args, Some(&go));
                // The kernels store offsets' and masks' gradients into one buffer on the GPU;
                // here they come in two zeroed copies of it: their sum is that buffer.
                let gom: Vec<f32> = got["grad_offset"]
                    .iter()
                    .zip(&got["grad_mask"])
                    .map(|(a, b)| a + b)
                    .collect();
                let tag = format!("dcnv4 {} bwd vec {vec} lanes {lanes}", case.name);
                for (name, ours, golden, cpu) in [
                    ("grad_input", &got["grad_input"], &gi_ref, &ci),
                    ("grad_offset_mask", &gom, &gom_ref, &com),
                ] {
                    for (what, reference) in [("golden", golden), ("cpu op", cpu)] {
                        if let Err(e) = common::check_f32(
                            &format!("{tag} {name} vs {what}"),
                            ours,
                            reference,
                            case.grad_tol,
                        ) {
                            failures.push(e);
                        }
                    }
                }
            }
        }
    }
    assert_no_failures(&failures);
    assert!(runs >= 30, "only {runs} runs");
}
