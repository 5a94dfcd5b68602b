//! Links the kernel with its own script and embeds the user program images
//! named by `METAL_USER_DIR` (build.sh sets it; without it the kernel is built
//! with no images, which is enough for `cargo clippy`).
use std::{env, fs, path::PathBuf};

const PROGRAMS: &[&str] = &[
    "pct", "hello", "ftq", "fault", "pctcall", "pingpong", "spin", "ptltest",
];

fn main() {
    let dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let script = dir.join("kernel.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-env-changed=METAL_USER_DIR");
    for a in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-no-pie",
        "-Wl,--build-id=none",
        "-Wl,-z,max-page-size=0x1000",
    ] {
        println!("cargo:rustc-link-arg-bins={a}");
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-T,{}", script.display());

    let mut out = String::from("pub static IMAGES: &[(&str, &[u8])] = &[\n");
    if let Ok(user) = env::var("METAL_USER_DIR") {
        for p in PROGRAMS {
            let path = PathBuf::from(&user).join(p);
            println!("cargo:rerun-if-changed={}", path.display());
            if path.exists() {
                out.push_str(&format!(
                    "    ({p:?}, include_bytes!({:?})),\n",
                    path.display().to_string()
                ));
            }
        }
    }
    out.push_str("];\n");
    let dest = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("images.rs");
    fs::write(dest, out).expect("write images.rs into OUT_DIR");
}
