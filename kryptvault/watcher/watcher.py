"""Tell the vault, once and fast, that its token went away.

Routes, fastest first:
- "uevent": the kernel's `remove` uevent for the token's block device, a device above it,
  or anything below the stick's USB device (in the guest the first is `remove bsg`, about
  30-50 ms before `remove block sda`), or any other uevent about those devices followed by
  a presence check (a loop device that is detached only sends `change`);
- "mount": /proc/self/mountinfo signals POLLPRI on every mount-table change, followed by
  a presence check (an unmount, e.g. the desktop's "eject", is seen at once);
- "poll": `token.is_present()` every poll_interval, which needs nothing from the kernel;
- anything passed to `trigger(route)` from outside (the udev guard unit, the control API).

Every route ends in the same latch: `on_removed(route)` runs exactly once, in the thread
of whichever route won. One thread serves the first three routes with a single poll()
over the netlink socket, the mountinfo file and a self-pipe that `stop()` writes to.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable, Collection, Mapping

from kryptvault.token.base import Token
from kryptvault.token.sysfs import read_attr
from kryptvault.watcher.devices import WatchedDevices, watched_devices
from kryptvault.watcher.uevent import (
    NetlinkUnavailableError,
    Uevent,
    UeventListener,
    UeventOverflowError,
)

log = logging.getLogger("kryptvault.watcher")

ROUTES = ("uevent", "mount", "poll")
MAX_POLL_INTERVAL = 0.5
STOP_TIMEOUT = 0.3
MOUNTINFO = "/proc/self/mountinfo"

OnRemoved = Callable[[str], object]  # the return value is ignored
OnEvent = Callable[[str, dict[str, object]], object]


class TokenWatcher:
    """Watch one token; call `on_removed(route)` exactly once when it goes away.

    `on_event(kind, details)` (optional) gets "token_removed" just before on_removed (so the
    audit entry is written even if on_removed ends the process) and "token_plugged" when a
    USB device with the token's vendor/product/serial is plugged in. `routes` limits the
    automatic routes (all by default; tests use it to prove one route on its own).
    """

    def __init__(
        self,
        token: Token,
        on_removed: OnRemoved,
        poll_interval: float = 0.2,
        *,
        on_event: OnEvent | None = None,
        routes: Collection[str] = ROUTES,
    ) -> None:
        if not 0 < poll_interval <= MAX_POLL_INTERVAL:
            raise ValueError(f"poll_interval must be in (0, {MAX_POLL_INTERVAL}] s, not {poll_interval}")
        unknown = set(routes) - set(ROUTES)
        if unknown:
            raise ValueError(f"unknown watcher route(s): {', '.join(sorted(unknown))}")
        self.token = token
        self.poll_interval = poll_interval
        self._on_removed = on_removed
        self._on_event = on_event
        self._routes = frozenset(routes)
        # Resolved now, while the token is present: sysfs forgets a device once it is gone.
        self.devices = watched_devices(token) if "uevent" in self._routes else WatchedDevices(None, None)
        self.unavailable: dict[str, str] = {}  # route -> why it could not be used
        self._latch = threading.Lock()
        self._fired: str | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_thread: threading.Thread | None = None
        self._wake_lock = threading.Lock()
        self._wake_w = -1

    # ------------------------------------------------------------------ public
    @property
    def fired(self) -> str | None:
        """The route that reported the removal, or None while the token is present."""
        return self._fired

    @property
    def active_routes(self) -> tuple[str, ...]:
        return tuple(r for r in ROUTES if r in self._routes and r not in self.unavailable)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the watcher was already started")
        if self._stopping.is_set():
            return  # stopped before it started (e.g. a lock during start-up)
        # Listen before the first presence check, so a removal in between is not missed.
        listener = self._open_uevents()
        mounts = self._open_mountinfo()
        wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._thread = threading.Thread(
            target=self._run, args=(wake_r, listener, mounts), name="kryptvault-watcher", daemon=True
        )
        self._thread.start()
        if "poll" in self._routes:
            # Its own thread: a presence check can take tens of ms on a loaded machine, and
            # a uevent must never wait behind one.
            self._poll_thread = threading.Thread(target=self._poll, name="kryptvault-poll", daemon=True)
            self._poll_thread.start()

    def _poll(self) -> None:
        # The first check at once: the token may already be gone.
        while self._fired is None:
            try:
                self._check("poll")
            except Exception:
                log.exception("the token poll hit an error; carrying on")
            if self._stopping.wait(self.poll_interval):
                return

    def trigger(self, route: str, details: Mapping[str, object] | None = None) -> bool:
        """Report the removal by `route`; True if this call was the one that fired."""
        with self._latch:
            if self._fired is not None:
                return False
            self._fired = route
        self._emit("token_removed", {"route": route, **(details or {})})
        try:
            self._on_removed(route)
        except Exception:
            log.exception("on_removed failed")
        return True

    def stop(self) -> None:
        """End the thread; returns within STOP_TIMEOUT (at once when called from on_removed)."""
        self._stopping.set()
        with self._wake_lock:
            if self._wake_w >= 0:
                with contextlib.suppress(OSError):
                    os.write(self._wake_w, b"x")
                os.close(self._wake_w)  # if the write was lost, the hang-up still wakes poll()
                self._wake_w = -1
        for thread in (self._thread, self._poll_thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join(STOP_TIMEOUT)

    def __enter__(self) -> TokenWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ sources
    def _open_uevents(self) -> UeventListener | None:
        if "uevent" not in self._routes:
            return None
        if not self.devices.any:
            self.unavailable["uevent"] = "the token has no block or USB device (e.g. tmpfs)"
            return None
        try:
            return UeventListener.open()
        except NetlinkUnavailableError as exc:
            self.unavailable["uevent"] = str(exc)
            return None

    def _open_mountinfo(self) -> int | None:
        if "mount" not in self._routes:
            return None
        try:
            return os.open(MOUNTINFO, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self.unavailable["mount"] = f"cannot open {MOUNTINFO}: {exc.strerror}"
            return None

    # ------------------------------------------------------------------ the thread
    def _run(self, wake_r: int, listener: UeventListener | None, mounts: int | None) -> None:
        poller = select.poll()
        poller.register(wake_r, select.POLLIN)
        if listener is not None:
            poller.register(listener.fileno(), select.POLLIN)
        if mounts is not None:
            poller.register(mounts, select.POLLPRI)
        try:
            while not self._stopping.is_set():
                try:
                    for fd, _mask in poller.poll(None):
                        if self._stopping.is_set() or fd == wake_r:
                            break
                        if listener is not None and fd == listener.fileno():
                            if not self._read_uevents(listener):
                                poller.unregister(fd)  # broken: the other routes carry on
                        elif fd == mounts:
                            self._check("mount")
                except Exception:
                    # Never let the thread die: a dead watcher would never lock the vault.
                    log.exception("the token watcher hit an error; carrying on")
                    self._stopping.wait(self.poll_interval)
        finally:
            os.close(wake_r)
            if listener is not None:
                listener.close()
            if mounts is not None:
                os.close(mounts)

    def _read_uevents(self, listener: UeventListener) -> bool:
        """Handle what is pending; False if the socket broke and must not be polled again."""
        try:
            for event in listener.drain():
                self._on_uevent(event)
        except UeventOverflowError:
            self._check("uevent")  # the lost events may have included our remove
        except OSError as exc:
            log.error("kernel uevents failed (%s); relying on the other routes", exc.strerror or exc)
            self.unavailable["uevent"] = f"the netlink socket failed: {exc.strerror or exc}"
            return False
        return True

    def _on_uevent(self, event: Uevent) -> None:
        if event.action == "add" and event.devtype == "usb_device" and self._is_our_stick(event.devpath):
            self._emit("token_plugged", {"device": event.devpath})
        if self._fired is not None or not self.devices.concerns(event.devpath):
            return
        if event.action == "remove" and self.devices.removal_means_gone(event.devpath):
            self.trigger("uevent", {"device": event.devpath})
        else:
            self._check("uevent")  # change/unbind/offline of our device: ask the token

    def _is_our_stick(self, devpath: str) -> bool:
        identity = self.token.identity
        if identity.kind != "usb":
            return False
        directory = "/sys" + devpath
        try:
            vendor = int(read_attr(directory, "idVendor") or "", 16)
            product = int(read_attr(directory, "idProduct") or "", 16)
        except ValueError:
            return False
        serial = read_attr(directory, "serial")
        return (vendor, product, serial) == (identity.vendor_id, identity.product_id, identity.serial)

    def _check(self, route: str) -> None:
        if self._fired is None and self._absent():
            self.trigger(route)

    def _absent(self) -> bool:
        # Asked twice: /proc/self/mounts read while another mount changes can be torn and
        # miss our entry once; a false lock is harmless but needless. Costs < 5 ms.
        return not self._present() and not self._present()

    def _present(self) -> bool:
        try:
            return self.token.is_present()
        except Exception:
            log.exception("is_present failed; treating the token as gone")
            return False

    def _emit(self, kind: str, details: dict[str, object]) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(kind, details)
        except Exception:
            log.exception("on_event failed")
