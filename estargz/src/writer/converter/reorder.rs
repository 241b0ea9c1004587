//! Prioritized files first: the input is spooled, then its entries are emitted in the
//! order `prioritized_files` asks for.

use std::collections::HashMap;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};

use super::{Converter, is_special};
use crate::error::{Error, Result};
use crate::index::normalize_path;
use crate::tar::{BLOCK, TarReader};
use crate::toc::PREFETCH_LANDMARK;
use crate::writer::WriteOutput;

impl<W: Write> Converter<W> {
    /// Spools the tar to a temporary file, then emits prioritized files (with their
    /// parent directories and hardlink targets) first, the landmark, then the rest.
    pub(super) fn run_reordered(&mut self, mut tar: Box<dyn Read + '_>) -> Result<WriteOutput> {
        let mut spool = tempfile::tempfile().map_err(|e| Error::io("creating a spool file", e))?;
        std::io::copy(&mut tar, &mut spool).map_err(|e| Error::io("spooling the input", e))?;
        spool
            .seek(SeekFrom::Start(0))
            .map_err(|e| Error::io("rewinding the spool", e))?;
        struct Spooled {
            name: String,
            start: u64,
            link: Option<String>,
            skip: bool,
        }
        let mut list: Vec<Spooled> = Vec::new();
        let mut tr = TarReader::new(BufReader::new(&mut spool));
        let trailer_start;
        loop {
            tr.read_padding()?;
            let start = tr.position();
            let Some(h) = tr.next_header()? else {
                trailer_start = start;
                break;
            };
            list.push(Spooled {
                name: normalize_path(&h.name)?,
                start,
                link: (h.typeflag == b'1')
                    .then(|| normalize_path(&h.link_name))
                    .transpose()?,
                skip: is_special(&h.name),
            });
        }
        drop(tr);
        let mut by_name: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, e) in list.iter().enumerate() {
            by_name.entry(e.name.as_str()).or_default().push(i);
        }
        let mut moved = vec![false; list.len()];
        let mut order: Vec<usize> = Vec::with_capacity(list.len());
        fn move_rec(
            name: &str,
            required: bool,
            list: &[Spooled],
            by_name: &HashMap<&str, Vec<usize>>,
            moved: &mut [bool],
            order: &mut Vec<usize>,
            depth: usize,
        ) -> Result<()> {
            let Some(ids) = by_name.get(name) else {
                if required {
                    return Err(Error::PrioritizedNotFound {
                        path: name.to_string(),
                    });
                }
                return Ok(());
            };
            if depth > 4096 || ids.iter().all(|&i| moved[i]) {
                return Ok(());
            }
            if !name.is_empty() {
                let parent = name.rfind('/').map_or("", |i| &name[..i]);
                move_rec(parent, false, list, by_name, moved, order, depth + 1)?;
            }
            for &i in ids {
                if let Some(target) = &list[i].link {
                    move_rec(target, false, list, by_name, moved, order, depth + 1)?;
                }
            }
            for &i in ids {
                if !moved[i] {
                    moved[i] = true;
                    order.push(i);
                }
            }
            Ok(())
        }
        for p in &self.prioritized {
            let name = normalize_path(p.trim_start_matches('/'))?;
            move_rec(&name, true, &list, &by_name, &mut moved, &mut order, 0)?;
        }
        let first_rest = order.len();
        order.extend((0..list.len()).filter(|&i| !moved[i]));
        for (n, &i) in order.iter().enumerate() {
            if n == first_rest {
                self.emit_landmark(PREFETCH_LANDMARK)?;
            }
            if list[i].skip {
                continue;
            }
            spool
                .seek(SeekFrom::Start(list[i].start))
                .map_err(|e| Error::io("seeking the spool", e))?;
            let mut tr = TarReader::new(BufReader::new(&mut spool));
            let h = tr.next_header()?.ok_or_else(|| Error::BadTar {
                offset: list[i].start,
                reason: "entry vanished from the spool".into(),
            })?;
            self.emit_entry(&h, &mut tr)?;
            tr.read_padding()?;
        }
        if first_rest == order.len() {
            self.emit_landmark(PREFETCH_LANDMARK)?;
        }
        spool
            .seek(SeekFrom::Start(trailer_start))
            .map_err(|e| Error::io("seeking the spool", e))?;
        // The end-of-archive blocks and anything after them, as they were.
        let mut end_raw = Vec::new();
        (&mut spool)
            .take(2 * BLOCK as u64)
            .read_to_end(&mut end_raw)
            .map_err(|e| Error::io("reading the spool", e))?;
        self.finish_tar(end_raw, Box::new(BufReader::new(spool)))
    }
}
