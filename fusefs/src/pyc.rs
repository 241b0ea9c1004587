//! What a compiled Python module (a `.pyc`) imports when it runs, and where Python would
//! find each of those modules. A Python program's start on an unoptimized image is mostly
//! the interpreter importing one module after another, each name known only once the
//! module that imports it has been read: a round trip per module. A package's
//! `__init__` names a dozen modules at once, so reading its compiled code is enough to
//! fetch them all together.
//!
//! Only the module's own top-level code is read (the imports that run when it is
//! imported; those inside functions may never run), and only CPython 3.8 to 3.12's
//! format, whose code object layouts and opcodes are known here. Anything else, or
//! anything malformed, says nothing (this only guides fetching).

use std::ops::Range;
use std::rc::Rc;

/// A `.pyc` bigger than this is not read for its imports.
pub const MAX_PYC: u64 = 4 << 20;
/// Bytes from the start enough for [`is_pyc`].
pub const HEAD_BYTES: usize = 4;
/// Nesting of marshal objects (code in tuples in code ...) a real module stays far below.
const MAX_DEPTH: usize = 64;
/// Objects read from one module at most: a real module's largest has some tens of
/// thousands; this bounds what a crafted one costs (each object takes 24 bytes here).
const MAX_OBJECTS: usize = 1 << 20;
/// Imports of one module at most, and modules looked for per import.
const MAX_IMPORTS: usize = 512;
const MAX_FROMLIST: usize = 64;

/// How a code object starts: how many 32-bit fields come before its bytecode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CodeLayout {
    /// 3.8 to 3.10: argcount, posonlyargcount, kwonlyargcount, nlocals, stacksize, flags;
    /// after the names: varnames, freevars, cellvars, filename, name, firstlineno, lnotab.
    Nlocals,
    /// 3.11 and 3.12: no nlocals; after the names: localsplusnames, localspluskinds,
    /// filename, name, qualname, firstlineno, linetable, exceptiontable.
    LocalsPlus,
}

/// The released versions' magic numbers (the first two bytes, little-endian).
fn layout_of(magic: u16) -> Option<CodeLayout> {
    match magic {
        3413 | 3425 | 3439 => Some(CodeLayout::Nlocals),
        3495 | 3531 => Some(CodeLayout::LocalsPlus),
        _ => None,
    }
}

/// Whether a file starting with `head` is compiled Python code of a version read here.
pub fn is_pyc(head: &[u8]) -> bool {
    layout_in(head).is_some()
}

/// The code layout of the version whose magic starts `head`, if it is one read here.
fn layout_in(head: &[u8]) -> Option<CodeLayout> {
    match head.get(..HEAD_BYTES)? {
        [a, b, b'\r', b'\n'] => layout_of(u16::from_le_bytes([*a, *b])),
        _ => None,
    }
}

/// One import statement of a module's top-level code: `import a.b` is `a.b` at level 0;
/// `from ..c import d, e` is `c` at level 2 with `[d, e]` (which may be submodules).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    pub name: String,
    pub level: u32,
    pub fromlist: Vec<String>,
}

/// What marshal holds, as far as imports need it.
#[derive(Debug, Clone)]
enum Value {
    /// The end of a dict.
    Null,
    None,
    Int(i64),
    Str(Rc<str>),
    Bytes(Range<usize>),
    Tuple(Rc<[Value]>),
    Code(Rc<Code>),
    Other,
}

#[derive(Debug)]
struct Code {
    bytecode: Range<usize>,
    consts: Rc<[Value]>,
    names: Rc<[Value]>,
}

/// Reads marshal data (Python's `marshal` module's format, version 4 and later).
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
    layout: CodeLayout,
    /// Objects written with the reference flag, in the order they started.
    refs: Vec<Value>,
    objects: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let bytes = self.buf.get(self.at..end)?;
        self.at = end;
        Some(bytes)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    /// A count of items that each take at least one byte: never more than remain.
    fn count(&mut self) -> Option<usize> {
        let n = usize::try_from(self.i32()?).ok()?;
        (n <= self.buf.len() - self.at).then_some(n)
    }

    fn text(&mut self, n: usize) -> Option<Value> {
        let bytes = self.take(n)?;
        Some(match std::str::from_utf8(bytes) {
            Ok(s) => Value::Str(Rc::from(s)),
            Err(_) => Value::Other,
        })
    }

    fn items(&mut self, n: usize, depth: usize) -> Option<Rc<[Value]>> {
        let mut items = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            items.push(self.object(depth + 1)?);
        }
        Some(items.into())
    }

    fn object(&mut self, depth: usize) -> Option<Value> {
        self.objects += 1;
        if depth > MAX_DEPTH || self.objects > MAX_OBJECTS {
            return None;
        }
        let byte = self.u8()?;
        // Its slot is taken before its contents are read, as marshal numbers them.
        let slot = (byte & 0x80 != 0).then(|| {
            self.refs.push(Value::Other);
            self.refs.len() - 1
        });
        let value = match byte & 0x7f {
            b'0' => Value::Null,
            b'N' => Value::None,
            b'F' | b'T' | b'S' | b'.' => Value::Other,
            b'i' => Value::Int(i64::from(self.i32()?)),
            b'I' => Value::Int(i64::from_le_bytes(self.take(8)?.try_into().ok()?)),
            b'l' => {
                let digits = self.i32()?.unsigned_abs() as usize;
                self.take(digits.checked_mul(2)?)?;
                Value::Other
            }
            b'g' => {
                self.take(8)?;
                Value::Other
            }
            b'y' => {
                self.take(16)?;
                Value::Other
            }
            b'f' => {
                let n = self.u8()?;
                self.take(n.into())?;
                Value::Other
            }
            b'x' => {
                for _ in 0..2 {
                    let n = self.u8()?;
                    self.take(n.into())?;
                }
                Value::Other
            }
            b's' => {
                let n = self.count()?;
                let start = self.at;
                self.take(n)?;
                Value::Bytes(start..self.at)
            }
            b't' | b'u' | b'a' | b'A' => {
                let n = self.count()?;
                self.text(n)?
            }
            b'z' | b'Z' => {
                let n = self.u8()?;
                self.text(n.into())?
            }
            b'(' => {
                let n = self.count()?;
                Value::Tuple(self.items(n, depth)?)
            }
            b')' => {
                let n = self.u8()?;
                Value::Tuple(self.items(n.into(), depth)?)
            }
            b'[' | b'<' | b'>' => {
                let n = self.count()?;
                self.items(n, depth)?;
                Value::Other
            }
            b'{' => {
                while !matches!(self.object(depth + 1)?, Value::Null) {
                    self.object(depth + 1)?;
                }
                Value::Other
            }
            b'c' => Value::Code(Rc::new(self.code(depth)?)),
            b'r' => {
                let index = usize::try_from(self.i32()?).ok()?;
                self.refs.get(index)?.clone()
            }
            _ => return None,
        };
        if let Some(slot) = slot {
            self.refs[slot] = value.clone();
        }
        Some(value)
    }

    fn code(&mut self, depth: usize) -> Option<Code> {
        // 32-bit fields before the bytecode, objects between the names and firstlineno,
        // and objects after it.
        let (before, after, tables) = match self.layout {
            CodeLayout::Nlocals => (6, 5, 1),
            CodeLayout::LocalsPlus => (5, 5, 2),
        };
        self.take(4 * before)?;
        let Value::Bytes(bytecode) = self.object(depth + 1)? else {
            return None;
        };
        let Value::Tuple(consts) = self.object(depth + 1)? else {
            return None;
        };
        let Value::Tuple(names) = self.object(depth + 1)? else {
            return None;
        };
        for _ in 0..after {
            self.object(depth + 1)?;
        }
        self.i32()?; // firstlineno
        for _ in 0..tables {
            self.object(depth + 1)?;
        }
        Some(Code {
            bytecode,
            consts,
            names,
        })
    }
}

// The opcodes that spell an import, the same from 3.8 to 3.12.
const CACHE: u8 = 0;
const LOAD_CONST: u8 = 100;
const IMPORT_NAME: u8 = 108;
const EXTENDED_ARG: u8 = 144;

/// The import statements of a `.pyc`'s top-level code, in order; `None` if it is not one
/// read here or is malformed.
pub fn imports(pyc: &[u8]) -> Option<Vec<Import>> {
    let layout = layout_in(pyc)?;
    // Magic, flags, then the source's mtime and size (or its hash): 16 bytes.
    let mut reader = Reader {
        buf: pyc,
        at: 16,
        layout,
        refs: Vec::new(),
        objects: 0,
    };
    let Value::Code(code) = reader.object(0)? else {
        return None;
    };
    let bytecode = pyc.get(code.bytecode.clone())?;
    let mut found = Vec::new();
    // `level` and `fromlist` are the two constants loaded right before IMPORT_NAME.
    let mut loaded: [Option<usize>; 2] = [None, None];
    let mut extended: usize = 0;
    for unit in bytecode.chunks_exact(2) {
        let arg = extended | usize::from(unit[1]);
        extended = 0;
        match unit[0] {
            EXTENDED_ARG => extended = arg.checked_shl(8).unwrap_or(0) & 0xffff_ffff,
            CACHE => {}
            LOAD_CONST => loaded = [loaded[1], Some(arg)],
            IMPORT_NAME => {
                if let Some(import) = import_at(&code, arg, loaded) {
                    found.push(import);
                    if found.len() == MAX_IMPORTS {
                        break;
                    }
                }
                loaded = [None, None];
            }
            _ => loaded = [None, None],
        }
    }
    Some(found)
}

fn import_at(code: &Code, name: usize, loaded: [Option<usize>; 2]) -> Option<Import> {
    let Value::Str(name) = code.names.get(name)? else {
        return None;
    };
    let Value::Int(level) = code.consts.get(loaded[0]?)? else {
        return None;
    };
    let fromlist = match code.consts.get(loaded[1]?)? {
        Value::None => Vec::new(),
        Value::Tuple(items) => items
            .iter()
            .take(MAX_FROMLIST)
            .filter_map(|v| match v {
                Value::Str(s) => Some(s.to_string()),
                _ => None,
            })
            .collect(),
        _ => return None,
    };
    Some(Import {
        name: name.to_string(),
        level: u32::try_from(*level).ok()?,
        fromlist,
    })
}

/// A module name's part: an identifier (so that no path built from it leaves its
/// directory).
fn is_identifier(part: &str) -> bool {
    let mut chars = part.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Where a compiled module lies: its source directory, its cache tag (`cpython-311` for
/// `__pycache__/x.cpython-311.pyc`; none for a `.pyc` beside its source's place).
struct Importer<'a> {
    dir: Vec<&'a str>,
    tag: Option<&'a str>,
}

impl<'a> Importer<'a> {
    fn of(path: &'a str) -> Option<Importer<'a>> {
        let mut parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let file = parts.pop()?;
        let stem = file.strip_suffix(".pyc")?;
        if parts.last() == Some(&"__pycache__") {
            parts.pop();
            // name.TAG.pyc or name.TAG.opt-N.pyc
            let tag = stem.split('.').nth(1)?;
            Some(Importer {
                dir: parts,
                tag: Some(tag),
            })
        } else {
            Some(Importer {
                dir: parts,
                tag: None,
            })
        }
    }

    /// `3.11` for `cpython-311`.
    fn version(&self) -> Option<String> {
        let digits = self.tag?.strip_prefix("cpython-")?;
        if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(format!("{}.{}", &digits[..1], &digits[1..]))
    }

    /// Where absolute imports are looked for, in order: where the importer's own top
    /// package lies (for `top`), then as `sys.path` has them: the standard library (above
    /// the importer, then where Debian and the official images install it) and its
    /// extension modules, then the site directories.
    fn roots(&self, top: &str) -> Vec<String> {
        let mut roots = Vec::new();
        if let Some(i) = self.dir.iter().position(|p| *p == top) {
            roots.push(self.dir[..i].join("/"));
        }
        let version = self.version();
        if let Some(version) = &version {
            let stdlib = format!("python{version}");
            if let Some(i) = self.dir.iter().position(|p| *p == stdlib) {
                let here = self.dir[..=i].join("/");
                let extensions = format!("{here}/lib-dynload");
                roots.push(here);
                roots.push(extensions);
            }
            for prefix in ["usr/lib", "usr/local/lib"] {
                roots.push(format!("{prefix}/{stdlib}"));
                roots.push(format!("{prefix}/{stdlib}/lib-dynload"));
            }
        }
        for i in (0..self.dir.len()).rev() {
            if matches!(self.dir[i], "site-packages" | "dist-packages") {
                roots.push(self.dir[..=i].join("/"));
            }
        }
        if let Some(version) = &version {
            roots.push(format!("usr/local/lib/python{version}/dist-packages"));
            roots.push(format!("usr/local/lib/python{version}/site-packages"));
            roots.push("usr/lib/python3/dist-packages".to_string());
        }
        let mut seen = std::collections::HashSet::new();
        roots.retain(|r| seen.insert(r.clone()));
        roots
    }

    /// The files Python would load for module `parts` under `root`, in its order: a
    /// package's `__init__`, an extension module, compiled source.
    fn files(&self, root: &str, parts: &[&str]) -> Vec<String> {
        let Some((last, dirs)) = parts.split_last() else {
            return Vec::new();
        };
        let mut dir = root.to_string();
        for part in dirs {
            if !dir.is_empty() {
                dir.push('/');
            }
            dir.push_str(part);
        }
        let at = |name: &str| {
            if dir.is_empty() {
                name.to_string()
            } else {
                format!("{dir}/{name}")
            }
        };
        let mut files = Vec::new();
        match self.tag {
            Some(tag) => {
                files.push(at(&format!("{last}/__pycache__/__init__.{tag}.pyc")));
                if tag.starts_with("cpython-") {
                    let triplet = format!("{}-linux-gnu", std::env::consts::ARCH);
                    files.push(at(&format!("{last}.{tag}-{triplet}.so")));
                }
                files.push(at(&format!("{last}.abi3.so")));
                files.push(at(&format!("{last}.so")));
                files.push(at(&format!("__pycache__/{last}.{tag}.pyc")));
            }
            None => {
                files.push(at(&format!("{last}/__init__.pyc")));
                files.push(at(&format!("{last}.so")));
                files.push(at(&format!("{last}.pyc")));
            }
        }
        files
    }
}

/// For each module the imports of the compiled module at `path` (relative to the root)
/// load, the files Python would try for it, in its order. `import a.b.c` loads `a`,
/// `a.b` and `a.b.c`; `from a import b` loads `a` and, if it is a submodule, `a.b`.
pub fn wanted(path: &str, imports: &[Import]) -> Vec<Vec<String>> {
    let Some(importer) = Importer::of(path) else {
        return Vec::new();
    };
    let mut seen = std::collections::HashSet::new();
    let mut wanted = Vec::new();
    for import in imports {
        let parts: Vec<&str> = import.name.split('.').filter(|p| !p.is_empty()).collect();
        if !parts.iter().all(|p| is_identifier(p)) {
            continue;
        }
        // Relative imports start in the importer's package, `level - 1` packages up.
        let base = match import.level {
            0 => None,
            level => {
                let up = level as usize - 1;
                if up > importer.dir.len() {
                    continue;
                }
                Some(importer.dir[..importer.dir.len() - up].join("/"))
            }
        };
        let mut modules: Vec<Vec<&str>> = (1..=parts.len()).map(|n| parts[..n].to_vec()).collect();
        for item in import.fromlist.iter().filter(|f| is_identifier(f)) {
            let mut submodule = parts.clone();
            submodule.push(item);
            modules.push(submodule);
        }
        for module in modules {
            if !seen.insert((base.clone(), module.join("."))) {
                continue;
            }
            let files: Vec<String> = match &base {
                Some(base) => importer.files(base, &module),
                None => importer
                    .roots(module[0])
                    .iter()
                    .flat_map(|root| importer.files(root, &module))
                    .collect(),
            };
            if !files.is_empty() {
                wanted.push(files);
            }
        }
    }
    wanted
}

#[cfg(test)]
#[path = "tests/pyc_tests.rs"]
mod tests;
