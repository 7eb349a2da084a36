//! `asya-host gateway | trace | send`: the logic behind the thin clap glue in `main.rs`.
