//! The library's layout: imports between its modules point one way, at
//! every level — among the top-level modules, among the submodules of any
//! module, and among files. `scripts/import-circles` (Python 3, which CI
//! has; a missing `python3` fails the test) reads `src/` and names every
//! circle; here it must find none, and it must find the circles planted in
//! a small tree of its own (so a script that stopped seeing would not pass
//! unnoticed).

use std::path::Path;
use std::process::{Command, Output};

fn import_circles(src: &Path) -> Output {
    Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/import-circles"))
        .arg(src)
        .output()
        .expect("python3 runs scripts/import-circles (CI has Python 3)")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn the_library_has_no_import_circles() {
    let out = import_circles(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(out.status.success(), "{}", text(&out));
}

/// Planted circles are found: two top-level modules naming each other
/// with `crate::`, and two submodules of one module naming each other
/// with `super::` and through a re-export; a child using its parent's
/// re-export of a sibling's item is not a circle.
#[test]
fn import_circles_finds_planted_circles() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    let write = |rel: &str, text: &str| {
        let path = src.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write("lib.rs", "pub mod a;\npub mod b;\npub mod m;\n");
    write("a.rs", "use crate::b::B;\npub struct A;\n");
    write("b.rs", "pub struct B;\nfn f() { crate::a::A; }\n");
    write(
        "m/mod.rs",
        "mod error;\npub mod x;\npub mod y;\npub use error::E;\npub use y::Y;\n",
    );
    write("m/error.rs", "pub struct E;\n");
    write("m/x.rs", "use super::E;\nuse super::Y;\npub struct X;\n");
    write("m/y/mod.rs", "pub mod z;\npub use z::Y;\n");
    write(
        "m/y/z.rs",
        "pub struct Y;\nfn g() { super::super::x::X; }\n",
    );
    let out = import_circles(src);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("top-level modules: 2: a b"), "{said}");
    assert!(said.contains("submodules of m: 2: x y"), "{said}");
    assert!(
        !said.contains("error"),
        "a re-exported item is its file's: {said}"
    );

    // Without the planted edges, nothing.
    write("b.rs", "pub struct B;\n");
    write("m/y/z.rs", "pub struct Y;\n");
    let out = import_circles(src);
    assert!(out.status.success(), "{}", text(&out));
}
