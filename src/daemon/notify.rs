//! Telling systemd how the daemon is doing (`Type=notify`): one datagram per state change to
//! the socket named by `$NOTIFY_SOCKET`. Without that variable (not under systemd) every
//! call is a no-op, so the daemon runs the same everywhere.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;

/// Where systemd listens for notifications, if it does.
fn socket_address() -> Option<std::ffi::OsString> {
    std::env::var_os("NOTIFY_SOCKET").filter(|s| !s.is_empty())
}

/// Sends `state` (newline-separated `KEY=value` pairs) to systemd. Returns `Ok(false)` when
/// not running under systemd.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(address) = socket_address() else {
        return Ok(false);
    };
    let socket = UnixDatagram::unbound()?;
    let bytes = address.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        send_abstract(&socket, name, state)?;
    } else {
        socket.send_to(state.as_bytes(), PathBuf::from(address))?;
    }
    Ok(true)
}

#[cfg(target_os = "linux")]
fn send_abstract(socket: &UnixDatagram, name: &[u8], state: &str) -> io::Result<()> {
    use std::os::linux::net::SocketAddrExt;
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(state.as_bytes(), &address)?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_socket: &UnixDatagram, _name: &[u8], _state: &str) -> io::Result<()> {
    Err(io::Error::new(io::ErrorKind::Unsupported, "abstract socket names need Linux"))
}

/// Sends `state`, logging (not failing) when systemd cannot be told: a lost notification
/// must not stop the proxy.
fn send(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!(error = %e, state, "cannot notify systemd");
    }
}

/// The listeners are bound and the daemon serves.
pub fn ready() {
    send("READY=1\nSTATUS=serving");
}

/// A reload has started; [`ready`] follows when it is done (successful or not).
pub fn reloading() {
    send(&format!("RELOADING=1\nMONOTONIC_USEC={}\nSTATUS=reloading", monotonic_usec()));
}

/// The daemon is stopping and drains its sessions.
pub fn stopping() {
    send("STOPPING=1\nSTATUS=draining sessions");
}

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares reload requests against.
pub fn monotonic_usec() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let micros = u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000;
    secs.saturating_mul(1_000_000).saturating_add(micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_usec();
        let b = monotonic_usec();
        assert!(a > 0 && b >= a);
    }
}
