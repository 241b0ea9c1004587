//! The workspace's one way to take a std `Mutex`. It lives here, in the crate every other
//! crate depends on, so that none keeps its own copy.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, poisoned or not.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves plain data that is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
