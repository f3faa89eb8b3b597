//! Benchmarks and the namespace lab. The `bench` binary is the entry point;
//! this library holds what tests share with it.

pub mod lab;
