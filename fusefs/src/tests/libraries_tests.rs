//! A program's libraries are fetched when it is first read, before the dynamic linker
//! asks for them: a layer laid out like a merged-/usr Debian image, made of this
//! machine's own `/bin/ls` and the libraries it needs.

use super::*;
use crate::{Libraries, LibraryLookup};

/// The finder of a one-layer image: every path is looked up in the layer itself,
/// following links as the mounter does.
struct OneLayer(std::sync::Weak<LayerFs>);

impl Libraries for OneLayer {
    fn wanted(&self, wanted: Vec<Vec<String>>) {
        let Some(fs) = self.0.upgrade() else {
            return;
        };
        for paths in wanted {
            for path in paths {
                match fs.fetch_library(&path) {
                    LibraryLookup::Here => break,
                    LibraryLookup::Elsewhere(next) => {
                        if fs.fetch_library(&next) == LibraryLookup::Here {
                            break;
                        }
                    }
                    LibraryLookup::Absent => {}
                }
            }
        }
        fs.fetch_found_libraries();
    }
}

const LIBS: &str = "usr/lib/x86_64-linux-gnu";

/// `usr/bin/ls` with its libraries from this machine, `lib` and the interpreter as the
/// links Debian has, and a library nobody needs.
fn ls_image() -> Option<(Vec<u8>, Vec<&'static str>)> {
    let needed = [
        "libc.so.6",
        "libselinux.so.1",
        "libpcre2-8.so.0",
        "ld-linux-x86-64.so.2",
    ];
    let mut b = tar::Builder::new(Vec::new());
    let add = |b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8]| {
        let mut h = header(tar::EntryType::Regular, 0o755, data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    };
    let link = |b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str| {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, path, target).unwrap();
    };
    add(&mut b, "usr/bin/ls", &std::fs::read("/usr/bin/ls").ok()?);
    for lib in needed {
        // The real file behind the soname's link.
        let real = std::fs::canonicalize(format!("/{LIBS}/{lib}")).ok()?;
        let name = real.file_name()?.to_str()?.to_string();
        add(
            &mut b,
            &format!("{LIBS}/{name}"),
            &std::fs::read(&real).ok()?,
        );
        if name != lib {
            link(&mut b, &format!("{LIBS}/{lib}"), &name);
        }
    }
    add(
        &mut b,
        &format!("{LIBS}/libunneeded.so.1"),
        &pattern(300_000, 7),
    );
    link(&mut b, "lib", "usr/lib");
    link(
        &mut b,
        "lib64/ld-linux-x86-64.so.2",
        "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    );
    let tar = b.into_inner().unwrap();
    Some((
        convert(&tar, OutputFormat::Estargz, &[]),
        vec![
            "libc.so.6",
            "libselinux.so.1",
            "libpcre2-8.so.0",
            "ld-linux-x86-64.so.2",
        ],
    ))
}

/// Whether every chunk of the file at `path` (links followed) is in the cache.
fn local(f: &Fixture, path: &str) -> bool {
    let index = f.fs.layer().index();
    let mut path = path.to_string();
    for _ in 0..4 {
        let id = index.resolve(index.lookup(&path).unwrap());
        let e = index.entry(id);
        if let Some(target) = e.symlink_target() {
            let dir = path.rsplit_once('/').map_or("", |(d, _)| d).to_string();
            path = crate::elf::resolve(&dir, target).unwrap();
            continue;
        }
        return e.chunks().iter().all(|c| f.cache.contains(&c.digest));
    }
    false
}

fn ls_fixture(library_fetch_bytes: u64) -> Option<(Fixture, Vec<&'static str>)> {
    if !cfg!(target_arch = "x86_64") {
        return None;
    }
    let (blob, needed) = ls_image()?;
    let config = FsConfig {
        library_fetch_bytes,
        ..quiet_config()
    };
    let f = fixture_with(FaultBlob::new(blob), config, 1 << 30);
    f.fs.set_libraries(Arc::new(OneLayer(Arc::downgrade(&f.fs))));
    Some((f, needed))
}

#[test]
fn reading_a_program_fetches_its_libraries_and_their_interpreter() {
    let Some((f, needed)) = ls_fixture(64 << 20) else {
        return;
    };
    // What the kernel reads first when it executes the program.
    f.read("usr/bin/ls", 0, 4096).unwrap();
    let all_local = || needed.iter().all(|lib| local(&f, &format!("{LIBS}/{lib}")));
    for _ in 0..500 {
        if all_local() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for lib in &needed {
        assert!(local(&f, &format!("{LIBS}/{lib}")), "{lib} was not fetched");
    }
    assert!(!local(&f, &format!("{LIBS}/libunneeded.so.1")));
    // Fetching guided by the program is not the container's reading: the access log
    // has the program alone.
    let accessed: Vec<String> = f.fs.accessed().into_iter().map(|a| a.path).collect();
    assert_eq!(accessed, vec!["usr/bin/ls".to_string()]);
}

#[test]
fn with_library_fetch_off_a_program_read_fetches_only_itself() {
    let Some((f, _)) = ls_fixture(0) else {
        return;
    };
    f.read("usr/bin/ls", 0, 4096).unwrap();
    let requests = f.blob.request_count();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(f.blob.request_count(), requests);
    assert!(!local(&f, &format!("{LIBS}/libc.so.6")));
}

/// A compiled Python package whose top-level code imports a sibling, a subpackage's
/// extension module and a module of the standard library; modules it imports only
/// inside functions lie beside them.
fn python_tar() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        b.append_data(&mut h, path, data).unwrap();
    };
    let triplet = format!("{}-linux-gnu", std::env::consts::ARCH);
    add(
        "app/__pycache__/__init__.cpython-311.pyc",
        include_bytes!("data/imports_example.cpython-311.pyc"),
    );
    add(
        "app/__pycache__/also_later.cpython-311.pyc",
        &pattern(100_000, 1),
    );
    add(
        "app/__pycache__/sibling.cpython-311.pyc",
        include_bytes!("data/imports_one.cpython-311.pyc"),
    );
    add(
        "app/sub/__pycache__/__init__.cpython-311.pyc",
        &pattern(100_000, 3),
    );
    add(
        &format!("app/sub/deeper.cpython-311-{triplet}.so"),
        &pattern(100_000, 4),
    );
    add(
        "usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc",
        &pattern(100_000, 5),
    );
    add(
        "usr/lib/python3.11/__pycache__/never_at_start.cpython-311.pyc",
        &pattern(100_000, 6),
    );
    add(DEEP, &pattern(100_000, 7));
    b.into_inner().unwrap()
}

/// What `sibling` (in turn) imports.
const DEEP: &str = "usr/lib/python3.11/__pycache__/deep_only_via_sibling.cpython-311.pyc";

/// Waits until every one of `paths` is local; false if that takes over 5 s.
fn wait_local(f: &Fixture, paths: &[String]) -> bool {
    for _ in 0..500 {
        if paths.iter().all(|path| local(f, path)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

fn imported_modules() -> [String; 4] {
    let triplet = format!("{}-linux-gnu", std::env::consts::ARCH);
    [
        "app/__pycache__/sibling.cpython-311.pyc".to_string(),
        "app/sub/__pycache__/__init__.cpython-311.pyc".to_string(),
        format!("app/sub/deeper.cpython-311-{triplet}.so"),
        "usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc".to_string(),
    ]
}

fn with_modules_fetched() -> FsConfig {
    FsConfig {
        library_fetch_bytes: 2 << 20,
        ..quiet_config()
    }
}

#[test]
fn reading_a_compiled_python_module_fetches_the_modules_it_imports() {
    let imported = imported_modules();
    let blob = convert(&python_tar(), OutputFormat::Estargz, &[]);
    let f = fixture_with(FaultBlob::new(blob), with_modules_fetched(), 1 << 30);
    f.fs.set_libraries(Arc::new(OneLayer(Arc::downgrade(&f.fs))));
    // The interpreter reads a compiled module whole, from its start.
    f.read("app/__pycache__/__init__.cpython-311.pyc", 0, 4096)
        .unwrap();
    // Its imports, and what they import in turn.
    let mut wanted = imported.to_vec();
    wanted.push(DEEP.to_string());
    wait_local(&f, &wanted);
    for path in &wanted {
        assert!(local(&f, path), "{path} was not fetched");
    }
    std::thread::sleep(Duration::from_millis(100));
    for path in [
        "app/__pycache__/also_later.cpython-311.pyc",
        "usr/lib/python3.11/__pycache__/never_at_start.cpython-311.pyc",
    ] {
        assert!(
            !local(&f, path),
            "{path} is imported only inside a function"
        );
    }
}

/// Through a SOCI index a module costs its whole span: a module fetched for an import
/// is read for its own imports only once the container reads it (an import that does
/// not run would cost the spans of its imports too).
#[test]
fn through_a_soci_index_imports_are_followed_one_read_at_a_time() {
    let f = super::soci_tests::soci_fixture_of(&python_tar(), with_modules_fetched());
    f.fs.set_libraries(Arc::new(OneLayer(Arc::downgrade(&f.fs))));
    f.read("app/__pycache__/__init__.cpython-311.pyc", 0, 4096)
        .unwrap();
    let imported = imported_modules();
    assert!(wait_local(&f, &imported), "the imports were not fetched");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !local(&f, DEEP),
        "a module found for an import was read for its own"
    );
    f.read("app/__pycache__/sibling.cpython-311.pyc", 0, 4096)
        .unwrap();
    assert!(
        wait_local(&f, &[DEEP.to_string()]),
        "the container read the module, and its import was not fetched"
    );
}

/// An optimized layer says what its container reads first: its record, not a module's
/// imports, guides fetching.
#[test]
fn an_optimized_layers_compiled_modules_are_not_read_for_imports() {
    let importer = "app/__pycache__/__init__.cpython-311.pyc";
    let blob = convert(&python_tar(), OutputFormat::Estargz, &[importer]);
    let f = fixture_with(FaultBlob::new(blob), with_modules_fetched(), 1 << 30);
    f.fs.set_libraries(Arc::new(OneLayer(Arc::downgrade(&f.fs))));
    f.read(importer, 0, 4096).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for path in &imported_modules() {
        assert!(!local(&f, path), "{path} was fetched");
    }
}
