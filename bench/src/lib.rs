//! lazysnap-bench: cold-start measurements of lazysnap against the ordinary full pull.
