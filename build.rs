//! Generates the C header with cbindgen into OUT_DIR on every build. The committed copy in
//! include/ is written only when asked (`CTS_UPDATE_HEADER=1 cargo build`); a test and CI
//! compare the two and fail on any difference.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=CTS_UPDATE_HEADER");
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml parses");
    let generated = out_dir.join("cluster_tls_store.h");
    match cbindgen::Builder::new().with_crate(&crate_dir).with_config(config).generate() {
        Ok(bindings) => {
            bindings.write_to_file(&generated);
            if std::env::var_os("CTS_UPDATE_HEADER").is_some_and(|v| v == "1") {
                bindings.write_to_file(crate_dir.join("include/cluster_tls_store.h"));
            }
        }
        Err(e) => {
            // A syntax error in src/ is reported by rustc with better context.
            println!("cargo:warning=cbindgen could not generate the header: {e}");
            std::fs::write(&generated, "/* header generation failed */\n").expect("OUT_DIR is writable");
        }
    }
    println!("cargo:rustc-env=CTS_GENERATED_HEADER={}", generated.display());
}
