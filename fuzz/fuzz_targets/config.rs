//! hostd's configuration (`hostd::config::Config::parse`, then `validate` and
//! `agent_options`): the fuzz input is the TOML text of `hostd.toml`.
//! Property: a configuration that parses serializes back to TOML that parses to the same
//! configuration.
#![no_main]

use hostd::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::parse(text) else {
        return;
    };
    if config.validate().is_ok() {
        let _ = config.agent_options();
    }
    let again = toml::to_string(&config).expect("a parsed config serializes");
    let reparsed = Config::parse(&again).expect("a serialized config parses");
    assert_eq!(reparsed, config, "round trip through {again}");
});
