//! The bindings as an app gets them: generated from the built library
//! for Swift, Kotlin and Python, and the Python one driving real calls
//! through `parley up` (tests/python/call.py), one of them to a device
//! asleep as a phone app is, woken through a local FCM stand-in.

use std::path::{Path, PathBuf};
use std::time::Duration;

const BINDGEN: &str = env!("CARGO_BIN_EXE_uniffi-bindgen");

/// target/<profile>/, where cargo put the library and the workspace's
/// binaries.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>")
        .to_path_buf()
}

fn library() -> PathBuf {
    let lib = target_dir().join("libparley_ffi.so");
    // `cargo test` links the tests against the rlib only; the shared
    // library an app loads comes from `cargo build -p parley-ffi`, which
    // scripts/test.sh runs first.
    assert!(
        lib.is_file(),
        "{} was not built: run `cargo build -p parley-ffi` first",
        lib.display()
    );
    lib
}

fn generate(language: &str, out: &Path) {
    let o = parley_tests::tool::run(
        BINDGEN,
        &parley_tests::tool::args(&[
            "generate",
            "--no-format",
            "--library",
            library().to_str().expect("UTF-8 path"),
            "--language",
            language,
            "--out-dir",
            out.to_str().expect("UTF-8 path"),
        ]),
        Duration::from_secs(60),
    );
    assert!(o.success, "uniffi-bindgen {language} failed:\n{}", o.text);
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn swift_and_kotlin_bindings_are_generated_with_the_whole_api() {
    let dir = tempfile::tempdir().unwrap();
    generate("swift", &dir.path().join("swift"));
    generate("kotlin", &dir.path().join("kotlin"));
    let swift = read(&dir.path().join("swift/parley_ffi.swift"));
    let kotlin = read(&dir.path().join("kotlin/uniffi/parley_ffi/parley_ffi.kt"));
    for name in [
        "startVerification",
        "createAccount",
        "startDevice",
        "dial",
        "answer",
        "hangup",
        "nextEvent",
        "normalizeHandle",
        "setPlatformToken",
        "background",
        "handlePush",
        "groupCall",
        "toneShare",
    ] {
        assert!(swift.contains(name), "Swift lacks {name}");
        assert!(kotlin.contains(name), "Kotlin lacks {name}");
    }
    assert!(dir.path().join("swift/parley_ffiFFI.h").is_file());
}

#[test]
fn python_binding_places_a_call_through_parley_up() {
    parley_tests::tool::require("python3");
    let parley = target_dir().join("parley");
    assert!(
        parley.is_file(),
        "{} is missing: build the workspace first (cargo test --workspace does)",
        parley.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let py = dir.path().join("py");
    generate("python", &py);
    // The module loads the library from its own directory.
    std::fs::copy(library(), py.join("libparley_ffi.so")).unwrap();

    // Google's FCM, for the part where Bob sleeps as a phone app does.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let fcm = rt.block_on(parley_tests::fcm::FakeFcm::start(3600));
    let fcm_log = dir.path().join("fcm-sent.jsonl");
    fcm.log_to(fcm_log.clone());
    let account = dir.path().join("service-account.json");
    std::fs::write(&account, fcm.service_account_json()).unwrap();
    let google_ca = dir.path().join("google-ca.pem");
    std::fs::write(&google_ca, &fcm.ca_pem).unwrap();
    let upstream = format!(
        "[courier.upstream.fcm]\nservice_account = \"{}\"\nurl = \"127.0.0.1:{}\"\nca = \"{}\"\n",
        account.display(),
        fcm.addr.port(),
        google_ca.display()
    );
    let (data, up) =
        parley_tests::up::start_lab_on(parley.to_str().unwrap(), dir.path(), None, &[], &upstream);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/call.py");
    let (ids, courier, sip) = (
        up.ids.to_string(),
        up.courier.to_string(),
        up.sip_tls.to_string(),
    );
    let (ca, outbox) = (data.join("ca.pem"), data.join("outbox"));
    let env = [
        ("PYTHONPATH", py.to_str().unwrap()),
        ("PARLEY_IDS", ids.as_str()),
        ("PARLEY_COURIER", courier.as_str()),
        ("PARLEY_SIP", sip.as_str()),
        ("PARLEY_CA", ca.to_str().unwrap()),
        ("PARLEY_OUTBOX", outbox.to_str().unwrap()),
        ("PARLEY_FCM_SENT", fcm_log.to_str().unwrap()),
    ];
    let o = parley_tests::tool::run_with(
        None,
        &env,
        "python3",
        &[script.to_str().unwrap().to_string()],
        Duration::from_secs(120),
    );
    assert!(o.success && o.text.contains("OK"), "call.py:\n{}", o.text);
}
