//! Index artifacts: ranges of an image known before mounting it (DESIGN §8).

pub mod artifact;
