//! The harness itself: the test CA issues certificates rustls accepts.

mod common;

#[test]
fn test_ca_issues_a_loadable_certificate() {
    let issued = common::pki::pki().issue("smoke");
    let pem = std::fs::read_to_string(&issued.cert_file).unwrap();
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2);
}
