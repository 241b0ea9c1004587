//! Which of an image's layers holds a library one of its programs needs: the mounter's
//! part of fetching a program's libraries ahead (see [`fusefs::Libraries`]). The layer
//! that read the program looks in itself first, then in the image's other mounted
//! layers, nearest first, as the dynamic linker would find the file in the merged
//! tree; a symbolic link is followed into whichever layer holds its target.

use std::sync::Arc;

use fusefs::{LayerFs, LibraryLookup};

/// Links followed across layers for one library at most.
const MAX_HOPS: usize = 8;

/// A layer asked for a library by path.
pub trait LibrarySource {
    /// Whether `path` is here; a file found is fetched at the next [`Self::fetch_found`].
    fn fetch_library(&self, path: &str) -> LibraryLookup;
    fn fetch_found(&self);
}

impl LibrarySource for Arc<LayerFs> {
    fn fetch_library(&self, path: &str) -> LibraryLookup {
        LayerFs::fetch_library(self, path)
    }

    fn fetch_found(&self) {
        LayerFs::fetch_found_libraries(self)
    }
}

/// For each library, tries its paths in order in `layers` (nearest first) and has the
/// first layer that holds one fetch it; each layer then fetches what it holds at once.
/// Returns how many were found.
pub fn fetch_wanted<L: LibrarySource>(layers: &[L], wanted: &[Vec<String>]) -> usize {
    let found = wanted
        .iter()
        .filter(|paths| paths.iter().any(|p| fetch_one(layers, p)))
        .count();
    for layer in layers {
        layer.fetch_found();
    }
    found
}

/// Looks `path` up in `layers`, following links into other layers.
fn fetch_one<L: LibrarySource>(layers: &[L], path: &str) -> bool {
    let mut path = path.to_string();
    'hop: for _ in 0..MAX_HOPS {
        for layer in layers {
            match layer.fetch_library(&path) {
                LibraryLookup::Here => return true,
                LibraryLookup::Elsewhere(next) => {
                    path = next;
                    continue 'hop;
                }
                LibraryLookup::Absent => {}
            }
        }
        return false;
    }
    false
}

/// The finder a mounted layer gets: the image's layers come from the mounter's table
/// when asked (the image may gain layers after this one was mounted).
pub struct LibraryFinder {
    layers: Box<dyn Fn() -> Vec<Arc<LayerFs>> + Send + Sync>,
}

impl LibraryFinder {
    /// `layers`: this layer, then the image's other mounted layers, nearest first.
    pub fn new(layers: impl Fn() -> Vec<Arc<LayerFs>> + Send + Sync + 'static) -> Self {
        LibraryFinder {
            layers: Box::new(layers),
        }
    }
}

impl fusefs::Libraries for LibraryFinder {
    fn wanted(&self, wanted: Vec<Vec<String>>) {
        let layers = (self.layers)();
        let found = fetch_wanted(&layers, &wanted);
        tracing::debug!(
            wanted = wanted.len(),
            found,
            layers = layers.len(),
            "libraries looked up"
        );
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::HashMap;

    use super::*;

    /// A layer of files and links, recording what it was asked to fetch.
    #[derive(Default)]
    struct FakeLayer {
        files: Vec<&'static str>,
        links: HashMap<&'static str, &'static str>,
        fetched: RefCell<Vec<String>>,
    }

    impl LibrarySource for FakeLayer {
        fn fetch_library(&self, path: &str) -> LibraryLookup {
            if self.files.contains(&path) {
                self.fetched.borrow_mut().push(path.to_string());
                LibraryLookup::Here
            } else if let Some(target) = self.links.get(path) {
                LibraryLookup::Elsewhere(target.to_string())
            } else {
                LibraryLookup::Absent
            }
        }

        fn fetch_found(&self) {}
    }

    #[test]
    fn the_first_path_found_in_the_nearest_layer_is_fetched_and_links_cross_layers() {
        let top = FakeLayer {
            files: vec!["usr/lib/x86_64-linux-gnu/libnode.so.108"],
            links: HashMap::from([(
                "usr/lib/x86_64-linux-gnu/libuv.so.1",
                "usr/lib/x86_64-linux-gnu/libuv.so.1.0.0",
            )]),
            ..FakeLayer::default()
        };
        let base = FakeLayer {
            files: vec![
                "usr/lib/x86_64-linux-gnu/libc.so.6",
                "usr/lib/x86_64-linux-gnu/libuv.so.1.0.0",
                "usr/lib/x86_64-linux-gnu/libnode.so.108",
            ],
            ..FakeLayer::default()
        };
        let wanted: Vec<Vec<String>> = [
            vec![
                "lib/x86_64-linux-gnu/libc.so.6",
                "usr/lib/x86_64-linux-gnu/libc.so.6",
            ],
            vec!["usr/lib/x86_64-linux-gnu/libnode.so.108"],
            vec!["usr/lib/x86_64-linux-gnu/libuv.so.1"],
            vec!["usr/lib/x86_64-linux-gnu/libmissing.so.1"],
        ]
        .iter()
        .map(|v| v.iter().map(|s| s.to_string()).collect())
        .collect();
        let layers = [top, base];
        assert_eq!(fetch_wanted(&layers, &wanted), 3);
        // libnode from the top layer, which hides the base's.
        assert_eq!(
            *layers[0].fetched.borrow(),
            vec!["usr/lib/x86_64-linux-gnu/libnode.so.108".to_string()]
        );
        assert_eq!(
            *layers[1].fetched.borrow(),
            vec![
                "usr/lib/x86_64-linux-gnu/libc.so.6".to_string(),
                "usr/lib/x86_64-linux-gnu/libuv.so.1.0.0".to_string()
            ]
        );
    }

    #[test]
    fn a_link_loop_ends() {
        let layer = FakeLayer {
            links: HashMap::from([("a", "b"), ("b", "a")]),
            ..FakeLayer::default()
        };
        assert_eq!(fetch_wanted(&[layer], &[vec!["a".to_string()]]), 0);
    }
}
