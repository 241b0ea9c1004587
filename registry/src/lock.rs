//! The crate's one way to take a std `Mutex`.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, poisoned or not.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves plain data that is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}
