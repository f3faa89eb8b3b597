//! Arbitrary frames through the engine: first byte = ingress port, rest =
//! frame. Same harness as the bounded CI run in dataplane/tests/engine_fuzz.rs.
#![no_main]

#[path = "../../dataplane/tests/support/mod.rs"]
mod support;

use std::cell::RefCell;

use libfuzzer_sys::fuzz_target;

thread_local! {
    // One lab for the whole run so conntrack state accumulates across inputs.
    static LAB: RefCell<support::Lab> = RefCell::new(support::fuzz_lab());
}

fuzz_target!(|data: &[u8]| {
    LAB.with(|lab| support::exercise(&mut lab.borrow_mut(), data));
});
