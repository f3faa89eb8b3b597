#![allow(dead_code)]
pub mod cluster;
pub mod fake_apiserver;
