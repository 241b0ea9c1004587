//! What a dynamically linked ELF object will have the dynamic linker load: its
//! interpreter and the libraries its dynamic section names, with the places the linker
//! looks for each. A program's start on an unoptimized image is mostly the loader
//! reading one library after another, each name known only once the previous object's
//! bytes are in: a round trip per library. Knowing the names from the first object's
//! bytes lets them all be fetched at once.
//!
//! Only 64-bit little-endian objects (x86-64, AArch64 and the like) are read; anything
//! else, or anything malformed, says nothing (this only guides fetching).

/// Where the parts of an object that name its dependencies lie in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub machine: u16,
    /// The `PT_INTERP` segment (the dynamic linker's path), as file offset and length.
    pub interp: Option<(u64, u64)>,
    /// The `PT_DYNAMIC` segment, as file offset and length.
    pub dynamic: Option<(u64, u64)>,
    /// Every `PT_LOAD`: virtual address, file offset, file size.
    loads: Vec<(u64, u64, u64)>,
}

/// What the dynamic section says: string table offsets of the needed libraries and of
/// the search paths, and where the string table is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dynamic {
    needed: Vec<u64>,
    runpath: Option<u64>,
    rpath: Option<u64>,
    strtab_vaddr: Option<u64>,
    strtab_size: Option<u64>,
}

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;
pub const EM_X86_64: u16 = 62;
pub const EM_AARCH64: u16 = 183;

/// Bytes from the start of a file enough for [`layout`] on ordinary objects.
pub const HEAD_BYTES: u64 = 4096;

/// Bounds on what is read: a dynamic section larger than this, or more needed
/// libraries, are not an ordinary object's.
const MAX_DYNAMIC: u64 = 64 << 10;
const MAX_NEEDED: usize = 256;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Whether `head` starts like an ELF object (any class).
pub fn is_elf(head: &[u8]) -> bool {
    head.starts_with(b"\x7fELF")
}

/// The layout of the object whose first bytes are `head`, if it is a 64-bit
/// little-endian ELF object whose program headers lie within `head`.
pub fn layout(head: &[u8]) -> Option<Layout> {
    if head.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let machine = u16_at(head, 18)?;
    let phoff = usize::try_from(u64_at(head, 32)?).ok()?;
    let phentsize = usize::from(u16_at(head, 54)?);
    let phnum = usize::from(u16_at(head, 56)?);
    if phentsize < 56 {
        return None;
    }
    let mut out = Layout {
        machine,
        interp: None,
        dynamic: None,
        loads: Vec::new(),
    };
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        let kind = u32_at(head, ph)?;
        let offset = u64_at(head, ph + 8)?;
        let vaddr = u64_at(head, ph + 16)?;
        let filesz = u64_at(head, ph + 32)?;
        match kind {
            PT_LOAD => out.loads.push((vaddr, offset, filesz)),
            PT_DYNAMIC if filesz <= MAX_DYNAMIC => out.dynamic = Some((offset, filesz)),
            PT_INTERP if filesz <= 4096 => out.interp = Some((offset, filesz)),
            _ => {}
        }
    }
    Some(out)
}

impl Layout {
    /// The file offset of virtual address `vaddr`.
    pub fn offset_of(&self, vaddr: u64) -> Option<u64> {
        self.loads
            .iter()
            .find(|(v, _, size)| vaddr >= *v && vaddr - v < *size)
            .map(|(v, off, _)| off + (vaddr - v))
    }
}

/// Reads the entries of a dynamic section.
pub fn dynamic(section: &[u8]) -> Dynamic {
    let mut out = Dynamic::default();
    for entry in section.chunks_exact(16) {
        let (Some(tag), Some(value)) = (u64_at(entry, 0), u64_at(entry, 8)) else {
            break;
        };
        match tag {
            DT_NULL => break,
            DT_NEEDED if out.needed.len() < MAX_NEEDED => out.needed.push(value),
            DT_STRTAB => out.strtab_vaddr = Some(value),
            DT_STRSZ => out.strtab_size = Some(value),
            DT_RUNPATH => out.runpath = Some(value),
            DT_RPATH => out.rpath = Some(value),
            _ => {}
        }
    }
    out
}

impl Dynamic {
    /// Where the string table lies in the file, as offset and length.
    pub fn strtab(&self, layout: &Layout) -> Option<(u64, u64)> {
        let size = self.strtab_size?;
        Some((layout.offset_of(self.strtab_vaddr?)?, size))
    }

    /// The string table offsets of the needed libraries' names.
    pub fn needed(&self) -> &[u64] {
        &self.needed
    }

    /// The string table offset of the search path the object gives (`DT_RUNPATH`, else
    /// `DT_RPATH`).
    pub fn search(&self) -> Option<u64> {
        self.runpath.or(self.rpath)
    }
}

/// Bytes read for one string of the table: a name or a search path is shorter. (A big
/// C++ library's string table runs to megabytes, and its needed names may lie at the
/// end: each is read where it is, not the table whole.)
pub const MAX_STRING: u64 = 4096;

/// The string at the start of `bytes` (up to its NUL).
pub fn c_string(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&bytes[..end]).ok().map(str::to_string)
}

/// The directories the dynamic linker searches by default for `machine`, relative to
/// the root (Debian's multiarch directories first).
fn system_dirs(machine: u16) -> &'static [&'static str] {
    match machine {
        EM_X86_64 => &[
            "lib/x86_64-linux-gnu",
            "usr/lib/x86_64-linux-gnu",
            "lib64",
            "usr/lib64",
            "lib",
            "usr/lib",
            "usr/local/lib",
        ],
        EM_AARCH64 => &[
            "lib/aarch64-linux-gnu",
            "usr/lib/aarch64-linux-gnu",
            "lib64",
            "usr/lib64",
            "lib",
            "usr/lib",
            "usr/local/lib",
        ],
        _ => &["lib64", "usr/lib64", "lib", "usr/lib", "usr/local/lib"],
    }
}

/// Where a symbolic link in `dir` to `target` points, relative to the root.
pub fn resolve(dir: &str, target: &str) -> Option<String> {
    if target.starts_with('/') {
        join("", target)
    } else {
        join(dir, target)
    }
}

/// Joins `dir` and `name` relative to the root, resolving `.` and `..`.
fn join(dir: &str, name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in dir.split('/').chain(name.split('/')) {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

/// For each library `object` (at `path`, relative to the root) needs, the paths it may
/// be found at, in the order the dynamic linker tries them: a name with a slash as it
/// is; else the object's search path (`$ORIGIN` its own directory), then the system
/// directories.
pub fn candidates(
    path: &str,
    machine: u16,
    needed: &[String],
    search: Option<&str>,
) -> Vec<Vec<String>> {
    let origin = path.rsplit_once('/').map_or("", |(dir, _)| dir);
    let own: Vec<String> = search
        .into_iter()
        .flat_map(|s| s.split(':'))
        .filter(|d| !d.is_empty())
        .map(|d| d.replace("${ORIGIN}", origin).replace("$ORIGIN", origin))
        .collect();
    needed
        .iter()
        .map(|name| {
            if name.contains('/') {
                return join("", name).into_iter().collect();
            }
            own.iter()
                .map(String::as_str)
                .chain(system_dirs(machine).iter().copied())
                .filter_map(|dir| join(dir, name))
                .collect()
        })
        .collect()
}

/// The interpreter's path relative to the root, from the `PT_INTERP` bytes.
pub fn interp_path(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    let text = std::str::from_utf8(&bytes[..end]).ok()?;
    join("", text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a real object says it needs.
    struct Needs {
        layout: Layout,
        needed: Vec<String>,
        interp: Option<String>,
    }

    /// The dependencies of a real object on this machine, read as lazysnapd reads them:
    /// head, then dynamic section, then the strings.
    fn needs_of(file: &str) -> Option<Needs> {
        let bytes = std::fs::read(file).ok()?;
        let layout = layout(&bytes[..HEAD_BYTES as usize])?;
        let slice = |(off, len): (u64, u64)| &bytes[off as usize..(off + len) as usize];
        let interp = layout.interp.map(slice).and_then(interp_path);
        let dynamic = dynamic(slice(layout.dynamic?));
        let (table, size) = dynamic.strtab(&layout)?;
        let string = |off: u64| {
            (off < size)
                .then(|| c_string(&bytes[(table + off) as usize..]))
                .flatten()
        };
        let needed = dynamic.needed().iter().filter_map(|&o| string(o)).collect();
        Some(Needs {
            layout,
            needed,
            interp,
        })
    }

    #[test]
    fn a_real_program_needs_libc_through_its_interpreter() {
        let Needs {
            layout,
            needed,
            interp,
        } = needs_of("/bin/ls").expect("/bin/ls is ELF");
        assert!(needed.iter().any(|n| n == "libc.so.6"), "{needed:?}");
        let interp = interp.expect("ls has an interpreter");
        assert!(
            interp.starts_with("lib") && interp.contains("ld-linux"),
            "{interp}"
        );
        let paths = candidates("usr/bin/ls", layout.machine, &needed, None);
        let libc = &paths[needed.iter().position(|n| n == "libc.so.6").unwrap_or(0)];
        let found = libc
            .iter()
            .find(|p| std::path::Path::new("/").join(p).exists());
        assert!(found.is_some(), "{libc:?}");
    }

    #[test]
    fn a_shared_library_needs_its_own_and_a_script_needs_nothing() {
        // libstdc++ needs libm and libc; a shell script is not ELF.
        let lib = std::fs::read_dir("/usr/lib/x86_64-linux-gnu")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().contains("libstdc++.so.6."));
        if let Some(lib) = lib {
            let Needs { needed, interp, .. } = needs_of(&lib.to_string_lossy()).expect("ELF");
            assert!(needed.iter().any(|n| n == "libm.so.6"), "{needed:?}");
            assert!(interp.is_none());
        }
        assert!(layout(b"#!/bin/sh\necho hi\n").is_none());
        assert!(!is_elf(b"#!/bin/sh") && is_elf(b"\x7fELF\x02"));
        assert!(layout(b"\x7fELF\x01\x01").is_none(), "32-bit is not read");
    }

    #[test]
    fn search_paths_come_first_with_origin_and_dotdot_resolved() {
        let needed = vec!["libjli.so".to_string(), "/opt/x/libabs.so".to_string()];
        let paths = candidates(
            "usr/lib/jvm/java-17/bin/java",
            EM_X86_64,
            &needed,
            Some("$ORIGIN/../lib:${ORIGIN}/sub"),
        );
        assert_eq!(paths[0][0], "usr/lib/jvm/java-17/lib/libjli.so");
        assert_eq!(paths[0][1], "usr/lib/jvm/java-17/bin/sub/libjli.so");
        assert_eq!(paths[0][2], "lib/x86_64-linux-gnu/libjli.so");
        assert_eq!(paths[1], vec!["opt/x/libabs.so".to_string()]);
        // Climbing above the root names nothing: the system directories remain.
        let above = candidates("a", EM_X86_64, &["x.so".into()], Some("$ORIGIN/../.."));
        assert_eq!(above[0][0], "lib/x86_64-linux-gnu/x.so");
        assert_eq!(
            resolve("usr/lib", "../../lib64/x").as_deref(),
            Some("lib64/x")
        );
        assert_eq!(resolve("usr/lib", "/etc/x").as_deref(), Some("etc/x"));
        assert_eq!(
            join("", "/lib64/ld-linux-x86-64.so.2").as_deref(),
            Some("lib64/ld-linux-x86-64.so.2")
        );
    }

    #[test]
    fn malformed_objects_say_nothing_and_do_not_panic() {
        let mut head = vec![0u8; 128];
        head[..6].copy_from_slice(b"\x7fELF\x02\x01");
        // Program headers beyond the bytes given.
        head[32..40].copy_from_slice(&1_000_000u64.to_le_bytes());
        head[54..56].copy_from_slice(&56u16.to_le_bytes());
        head[56..58].copy_from_slice(&3u16.to_le_bytes());
        assert!(layout(&head).is_none());
        // A dynamic section cut short keeps what came before the cut.
        let mut section = Vec::new();
        section.extend_from_slice(&DT_NEEDED.to_le_bytes());
        section.extend_from_slice(&999u64.to_le_bytes());
        section.extend_from_slice(&[1, 2, 3]);
        let d = dynamic(&section);
        assert_eq!(d.needed(), &[999]);
        assert_eq!(d.search(), None);
        // A string without its end is no string.
        assert_eq!(c_string(b"libc.so"), None);
        assert_eq!(c_string(b"libc.so.6\0rest").as_deref(), Some("libc.so.6"));
    }
}
