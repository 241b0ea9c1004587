use super::*;

/// Compiled by CPython 3.11 from `data/imports_example.py` (its header says how).
const EXAMPLE: &[u8] = include_bytes!("data/imports_example.cpython-311.pyc");

fn import(name: &str, level: u32, fromlist: &[&str]) -> Import {
    Import {
        name: name.to_string(),
        level,
        fromlist: fromlist.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn a_modules_top_level_imports_are_read_and_those_in_functions_are_not() {
    assert!(is_pyc(EXAMPLE));
    assert_eq!(
        imports(EXAMPLE).unwrap(),
        vec![
            import("os", 0, &[]),
            import("os.path", 0, &[]),
            import("xml.etree.ElementTree", 0, &[]),
            import("collections", 0, &["OrderedDict", "abc"]),
            import("", 1, &["sibling"]),
            import("sub.deeper", 1, &["thing"]),
            import("", 2, &["uncle"]),
            import("json", 0, &[]),
            import("re", 0, &[]),
            import("maybe", 0, &[]),
        ]
    );
}

/// Marshal as CPython writes it, enough for a hand-made module.
struct Marshal(Vec<u8>);

impl Marshal {
    fn new(magic: u16) -> Marshal {
        let mut b = magic.to_le_bytes().to_vec();
        b.extend_from_slice(b"\r\n");
        b.extend_from_slice(&[0; 12]);
        Marshal(b)
    }
    fn byte(&mut self, b: u8) -> &mut Self {
        self.0.push(b);
        self
    }
    fn i32(&mut self, v: i32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn short_str(&mut self, s: &str, flag: u8) -> &mut Self {
        self.byte(b'z' | flag).byte(s.len() as u8);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.byte(b's').i32(b.len() as i32);
        self.0.extend_from_slice(b);
        self
    }
}

const FLAG_REF: u8 = 0x80;

/// A 3.10 module (the layout with `nlocals`): `import numpy; import numpy.linalg`, the
/// second name's first part a back-reference, with EXTENDED_ARG before an argument.
#[test]
fn the_older_code_layout_and_back_references_are_read() {
    let mut m = Marshal::new(3439);
    m.byte(b'c' | FLAG_REF);
    for _ in 0..6 {
        m.i32(0);
    }
    // LOAD_CONST 0, LOAD_CONST 1, IMPORT_NAME 0; NOP; LOAD_CONST 0, LOAD_CONST 1,
    // EXTENDED_ARG 0, IMPORT_NAME 1.
    m.bytes(&[100, 0, 100, 1, 108, 0, 9, 0, 100, 0, 100, 1, 144, 0, 108, 1]);
    // consts: (0, None); the int takes reference slot 1 (the code object took 0).
    m.byte(b')').byte(2).byte(b'i' | FLAG_REF).i32(0).byte(b'N');
    // names: ("numpy", "numpy.linalg")
    m.byte(b')').byte(2);
    m.short_str("numpy", FLAG_REF);
    m.short_str("numpy.linalg", 0);
    // varnames, freevars, cellvars: (); filename, name: refs to "numpy"; firstlineno;
    // lnotab.
    for _ in 0..3 {
        m.byte(b')').byte(0);
    }
    for _ in 0..2 {
        m.byte(b'r').i32(2);
    }
    m.i32(1).bytes(b"");
    assert_eq!(
        imports(&m.0).unwrap(),
        vec![import("numpy", 0, &[]), import("numpy.linalg", 0, &[])]
    );
    // The same bytes under 3.11's magic are read with 3.11's layout and do not parse.
    let mut newer = m.0.clone();
    newer[..2].copy_from_slice(&3495u16.to_le_bytes());
    assert_eq!(imports(&newer), None);
}

#[test]
fn what_is_not_a_known_pyc_or_is_malformed_says_nothing() {
    assert!(!is_pyc(b"\x7fELF"));
    // 3.13's magic: a layout not read here.
    let mut unknown = EXAMPLE.to_vec();
    unknown[..2].copy_from_slice(&3571u16.to_le_bytes());
    assert_eq!(imports(&unknown), None);
    // Cut anywhere: never a panic, and no import beyond those of the whole file.
    let all = imports(EXAMPLE).unwrap();
    for len in 0..EXAMPLE.len() {
        if let Some(found) = imports(&EXAMPLE[..len]) {
            assert!(found.len() <= all.len());
        }
    }
    // Tuples nested deeper than any module nests them.
    let mut deep = Marshal::new(3495);
    for _ in 0..10_000 {
        deep.byte(b')').byte(1);
    }
    assert_eq!(imports(&deep.0), None);
    // A count bigger than the file, a reference to a slot never made.
    let mut huge = Marshal::new(3495);
    huge.byte(b'(').i32(i32::MAX);
    assert_eq!(imports(&huge.0), None);
    let mut dangling = Marshal::new(3495);
    dangling.byte(b'r').i32(7);
    assert_eq!(imports(&dangling.0), None);
    // A module of more constants than any has: given up on, whatever memory they
    // would take (the same module with a few reads as one without imports).
    let module = |constants: usize| {
        let mut m = Marshal::new(3495);
        m.byte(b'c');
        for _ in 0..5 {
            m.i32(0);
        }
        m.bytes(&[]).byte(b'(').i32(constants as i32);
        m.0.resize(m.0.len() + constants, b'N');
        m.byte(b')').byte(0);
        for _ in 0..5 {
            m.byte(b'N');
        }
        m.i32(1).bytes(b"").bytes(b"");
        m.0
    };
    assert_eq!(imports(&module(3)), Some(Vec::new()));
    assert_eq!(imports(&module(2 << 20)), None);
    assert!(std::mem::size_of::<Value>() <= 24);
}

const SITE: &str = "usr/lib/python3/dist-packages";

#[test]
fn modules_are_looked_for_where_python_would_find_them() {
    let importer = format!("{SITE}/pkg/sub/__pycache__/mod.cpython-311.pyc");
    let wanted = wanted(
        &importer,
        &[
            import("pkg.other", 0, &[]),
            import("", 1, &["sibling"]),
            import("x", 2, &[]),
            import("os", 0, &[]),
        ],
    );
    let firsts: Vec<String> = wanted.iter().map(|files| files[0].clone()).collect();
    assert_eq!(
        firsts,
        vec![
            // `pkg` and `pkg.other`, from where the importer's own `pkg` lies.
            format!("{SITE}/pkg/__pycache__/__init__.cpython-311.pyc"),
            format!("{SITE}/pkg/other/__pycache__/__init__.cpython-311.pyc"),
            format!("{SITE}/pkg/sub/sibling/__pycache__/__init__.cpython-311.pyc"),
            format!("{SITE}/pkg/x/__pycache__/__init__.cpython-311.pyc"),
            // `os` is nowhere on the importer's path: the standard library first.
            "usr/lib/python3.11/os/__pycache__/__init__.cpython-311.pyc".to_string(),
        ]
    );
    // A module's forms in Python's order: package, extension module, compiled source.
    let triplet = format!("{}-linux-gnu", std::env::consts::ARCH);
    assert_eq!(
        wanted[2],
        vec![
            format!("{SITE}/pkg/sub/sibling/__pycache__/__init__.cpython-311.pyc"),
            format!("{SITE}/pkg/sub/sibling.cpython-311-{triplet}.so"),
            format!("{SITE}/pkg/sub/sibling.abi3.so"),
            format!("{SITE}/pkg/sub/sibling.so"),
            format!("{SITE}/pkg/sub/__pycache__/sibling.cpython-311.pyc"),
        ]
    );
    // The standard library and its extension modules are among the places for `os`.
    assert!(wanted[4].contains(&"usr/lib/python3.11/__pycache__/os.cpython-311.pyc".to_string()));
    assert!(wanted[4].contains(&format!("{SITE}/os/__pycache__/__init__.cpython-311.pyc")));
    assert!(wanted[4].contains(&format!(
        "usr/lib/python3.11/lib-dynload/os.cpython-311-{triplet}.so"
    )));
}

#[test]
fn names_that_would_leave_their_directory_are_not_looked_for() {
    let importer = "app/__pycache__/main.cpython-311.pyc";
    let wanted = wanted(
        importer,
        &[
            import("..", 0, &[]),
            import("a/b", 0, &[]),
            import("", 1, &["..", "ok"]),
            // Above the root.
            import("x", 5, &[]),
        ],
    );
    assert_eq!(wanted.len(), 1);
    assert_eq!(wanted[0][0], "app/ok/__pycache__/__init__.cpython-311.pyc");
}
