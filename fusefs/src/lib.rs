//! A read-only filesystem over one eStargz / zstd:chunked layer whose bytes are fetched on demand.
