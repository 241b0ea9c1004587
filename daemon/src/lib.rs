//! lazysnapd wiring.
