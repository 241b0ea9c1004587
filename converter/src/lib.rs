//! Conversion of images and layers into eStargz and zstd:chunked.
