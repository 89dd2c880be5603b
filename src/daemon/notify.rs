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
    use std::os::unix::net::UnixDatagram;
    use std::process::Command;
    use std::time::Duration;

    use super::*;

    /// Set in the child process that sends the notifications.
    const CHILD: &str = "POSTERN_NOTIFY_TEST_CHILD";
    const TEST: &str = "daemon::notify::tests::each_state_change_is_one_datagram_as_systemd_reads_it";

    /// Runs this test again in a child process whose `NOTIFY_SOCKET` is `address` (the
    /// variable is process-wide, so it is not changed in this multi-threaded test process).
    fn notify_from_child(address: &str) {
        let out = Command::new(std::env::current_exe().expect("test binary"))
            .args([TEST, "--exact", "--test-threads=1"])
            .env(CHILD, "1")
            .env("NOTIFY_SOCKET", address)
            .output()
            .expect("run the test binary again");
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        assert!(out.status.success(), "the notifying child failed: {}{}", text(&out.stdout), text(&out.stderr));
    }

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a notification datagram");
        String::from_utf8(buf[..n].to_vec()).expect("UTF-8 notification")
    }

    /// The datagrams sent, in order; checks the reload's `MONOTONIC_USEC` against this
    /// process's reading of `CLOCK_MONOTONIC` before and after the child ran.
    fn check_datagrams(socket: &UnixDatagram, before: u64, after: u64) {
        assert_eq!(receive(socket), "READY=1\nSTATUS=serving");
        let reloading = receive(socket);
        let usec = reloading
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .and_then(|rest| rest.strip_suffix("\nSTATUS=reloading"))
            .unwrap_or_else(|| panic!("unexpected reload notification: {reloading:?}"));
        assert!(usec.bytes().all(|b| b.is_ascii_digit()), "{reloading:?}");
        let usec: u64 = usec.parse().expect("MONOTONIC_USEC is a number");
        assert!(
            (before..=after).contains(&usec),
            "MONOTONIC_USEC={usec} is not CLOCK_MONOTONIC in microseconds between {before} and {after}"
        );
        assert_eq!(receive(socket), "STOPPING=1\nSTATUS=draining sessions");
        socket.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 16];
        assert!(socket.recv(&mut buf).is_err(), "one datagram per state change, no more");
    }

    #[test]
    fn each_state_change_is_one_datagram_as_systemd_reads_it() {
        if std::env::var_os(CHILD).is_some() {
            // A raw state first (the parent expects it verbatim), then the daemon's three.
            assert!(notify("X=1").is_ok_and(|sent| sent), "NOTIFY_SOCKET is set, so the state is sent");
            ready();
            reloading();
            stopping();
            return;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        socket.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let before = monotonic_usec();
        notify_from_child(path.to_str().expect("UTF-8 temp path"));
        let after = monotonic_usec();
        assert_eq!(receive(&socket), "X=1");
        check_datagrams(&socket, before, after);

        // An abstract socket name, as `@name` in the variable.
        #[cfg(target_os = "linux")]
        {
            use std::os::linux::net::SocketAddrExt;
            let name = format!("postern-notify-test-{}", std::process::id());
            let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).expect("name");
            let socket = UnixDatagram::bind_addr(&address).expect("bind the abstract notify socket");
            socket.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
            let before = monotonic_usec();
            notify_from_child(&format!("@{name}"));
            let after = monotonic_usec();
            assert_eq!(receive(&socket), "X=1");
            check_datagrams(&socket, before, after);
        }
    }

    #[test]
    fn without_notify_socket_nothing_is_sent() {
        if std::env::var_os("NOTIFY_SOCKET").is_some() {
            // Run under systemd: check the same in a child without the variable.
            let out = Command::new(std::env::current_exe().expect("test binary"))
                .args(["daemon::notify::tests::without_notify_socket_nothing_is_sent", "--exact"])
                .env_remove("NOTIFY_SOCKET")
                .output()
                .expect("run the test binary again");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
            return;
        }
        assert!(matches!(notify("READY=1"), Ok(false)));
    }
}
