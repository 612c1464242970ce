"""Fixtures for the SDK's tests: a real `qflare server` (HTTPS, its enclave
process, SQLite) in a temporary directory, driven through the `qflare` admin
CLI as an operator would, and MNIST read from the IDX files.

The binaries come from ``QFLARE_BIN_DIR``, else ``$CARGO_TARGET_DIR/release``,
else ``target/release`` of the workspace; the data from ``QFLARE_DATA_DIR``
(the MNIST directory). With ``QFLARE_REQUIRE_DATA=1`` missing data fails the
run instead of skipping it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import socket
import subprocess
import threading
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest

import qflare

WORKSPACE = Path(__file__).resolve().parents[2]
PATIENCE_SECS = 120


def binary_dir() -> Path:
    if "QFLARE_BIN_DIR" in os.environ:
        return Path(os.environ["QFLARE_BIN_DIR"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", WORKSPACE / "target"))
    return target / "release"


def binary(name: str) -> Path:
    path = binary_dir() / name
    if not path.exists():
        pytest.fail(f"{path} is missing: build it with `cargo build --release -p qflare-cli` "
                    f"(or set QFLARE_BIN_DIR)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`qflare server` as a child process, and the admin CLI against it."""

    def __init__(self, workdir: Path, federation: Dict[str, object],
                 enclave_args: Optional[List[str]] = None):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.enclave = binary("qflare-enclave")
        self.measurement = hashlib.sha384(self.enclave.read_bytes()).hexdigest()
        self.config = workdir / "qflare.yaml"
        lines = [
            "server:",
            f"  listen: 127.0.0.1:{self.port}",
            "  metrics_listen: null",
            f"  state_dir: {workdir / 'state'}",
            # Every device of a test shares 127.0.0.1, one address.
            "rate_limits:",
            "  enroll: { per_minute: 600, burst: 100 }",
            "  sessions: { per_minute: 6000, burst: 1000 }",
            "  public: { per_minute: 6000, burst: 1000 }",
            "enclave:",
            f"  command: {self.enclave}",
            f"  args: {json.dumps(enclave_args or [])}",
            # No TEE in the tests: the enclave is a hardened process.
            "  allow_software_mode: true",
            "federation:",
        ]
        for key, value in federation.items():
            lines.append(f"  {key}: {json.dumps(value)}")
        self.config.write_text("\n".join(lines) + "\n")
        self.log_path = workdir / "server.log"
        self.process = subprocess.Popen(
            [str(binary("qflare")), "--config", str(self.config), "server"],
            cwd=workdir,
            env=self._env("info"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self.log_path.open("wb"),
            text=True,
        )
        self.fingerprint = self._read_fingerprint()

    def _env(self, log: str) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QFLARE_")}
        env["RUST_LOG"] = log
        return env

    def _read_fingerprint(self) -> str:
        found: List[str] = []
        done = threading.Event()

        def read() -> None:
            header = False
            assert self.process.stdout is not None
            for line in self.process.stdout:
                if header:
                    found.append(line.strip())
                    done.set()
                    header = False
                header = line.startswith("server fingerprint")
            done.set()

        threading.Thread(target=read, daemon=True).start()
        if not done.wait(PATIENCE_SECS) or not found:
            self.stop()
            pytest.fail(f"the server printed no fingerprint; log:\n{self.log()}")
        return found[0]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def admin(self, *args: str) -> str:
        done = subprocess.run(
            [str(binary("qflare")), "--config", str(self.config), *args],
            cwd=self.workdir,
            env=self._env("warn"),
            capture_output=True,
            text=True,
            timeout=PATIENCE_SECS,
        )
        if done.returncode != 0:
            raise AssertionError(
                f"qflare {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
            )
        return done.stdout

    def token(self) -> str:
        return self.admin("token", "create", "--label", "pytest").strip().splitlines()[-1]

    def enroll(self, identity_dir: Path, name: str = "python-device") -> str:
        return qflare.enroll(self.url, self.token(), self.fingerprint, str(identity_dir), name=name)

    def status(self) -> dict:
        return json.loads(self.admin("round", "status", "--output", "json"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(PATIENCE_SECS)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture
def start_server(tmp_path: Path):
    """Starts servers with the given `federation` section (and extra enclave
    arguments); stops them after the test."""
    started: List[Server] = []

    def start(enclave_args: Optional[List[str]] = None, **federation: object) -> Server:
        server = Server(tmp_path, federation, enclave_args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


@pytest.fixture(scope="session")
def mnist():
    """MNIST as (train images, train labels, test images, test labels): images
    flattened to float32 in [0, 1]."""
    directory = os.environ.get("QFLARE_DATA_DIR")
    if not directory or not Path(directory, "train-images-idx3-ubyte.gz").exists():
        message = "MNIST not found: set QFLARE_DATA_DIR to the directory of its IDX .gz files"
        if os.environ.get("QFLARE_REQUIRE_DATA") == "1":
            pytest.fail(message)
        pytest.skip(message)
    d = Path(directory)
    load = lambda name: _idx(d / name)  # noqa: E731
    x = load("train-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0
    y = load("train-labels-idx1-ubyte.gz").astype(np.int64)
    xt = load("t10k-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0
    yt = load("t10k-labels-idx1-ubyte.gz").astype(np.int64)
    return x, y, xt, yt


class SoftmaxDevice:
    """Softmax regression (`linear.weight` [10, 784], `linear.bias` [10]) in
    NumPy, on one device's private shard and held-out set."""

    def __init__(self, x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray):
        self.x, self.y, self.x_test, self.y_test = x, y, x_test, y_test

    @staticmethod
    def initial() -> Dict[str, np.ndarray]:
        return {"linear.weight": np.zeros((10, 784), np.float32), "linear.bias": np.zeros(10, np.float32)}

    @staticmethod
    def _loss_and_accuracy(w, b, x, y):
        logits = x @ w.T + b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        loss = float(-np.log(p[np.arange(len(y)), y] + 1e-12).mean())
        return loss, float((p.argmax(axis=1) == y).mean()), p

    def fit(self, weights, config):
        w = weights["linear.weight"].astype(np.float32).copy()
        b = weights["linear.bias"].astype(np.float32).copy()
        rng = np.random.default_rng(config["seed"])
        lr, batch = config["learning_rate"], config["batch_size"]
        for _ in range(config["epochs"]):
            order = rng.permutation(len(self.y))
            for start in range(0, len(order), batch):
                i = order[start:start + batch]
                _, _, p = self._loss_and_accuracy(w, b, self.x[i], self.y[i])
                p[np.arange(len(i)), self.y[i]] -= 1.0
                w -= lr * (p.T @ self.x[i]) / len(i)
                b -= lr * p.mean(axis=0)
        loss, accuracy, _ = self._loss_and_accuracy(w, b, self.x, self.y)
        return {"linear.weight": w, "linear.bias": b}, len(self.y), {"loss": loss, "accuracy": accuracy}

    def evaluate(self, weights, config):
        loss, accuracy, _ = self._loss_and_accuracy(
            weights["linear.weight"], weights["linear.bias"], self.x_test, self.y_test
        )
        return loss, len(self.y_test), {"accuracy": accuracy}


def shards(mnist, devices: int, train_per_device: int, test_per_device: int) -> List[SoftmaxDevice]:
    x, y, xt, yt = mnist
    return [
        SoftmaxDevice(
            x[k * train_per_device:(k + 1) * train_per_device],
            y[k * train_per_device:(k + 1) * train_per_device],
            xt[k * test_per_device:(k + 1) * test_per_device],
            yt[k * test_per_device:(k + 1) * test_per_device],
        )
        for k in range(devices)
    ]


def run_in_threads(jobs: Dict[str, object]) -> Dict[str, object]:
    """Runs each zero-argument job in its own thread; returns each one's
    result or the exception it raised."""
    results: Dict[str, object] = {}

    def wrap(name, job):
        try:
            results[name] = job()
        except BaseException as err:  # noqa: BLE001 - handed back to the test
            results[name] = err

    threads = [threading.Thread(target=wrap, args=(n, j), daemon=True) for n, j in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(PATIENCE_SECS * 3)
    return results
