"""A 25-million-parameter model (100 MB in f32, ResNet-50's size) federated by
ten Python devices through a real server and enclave on this machine: round
time, bytes on the wire, and the peak resident memory of the server and the
enclave processes.

    QFLARE_BIN_DIR=target/release python python/benches/large_model.py [--devices 10] [--rounds 2]

Devices are threads of this process, sharing its memory; each `fit` is one
cheap, deterministic step (what is measured is the system's handling of the
size, not learning). Peak memory is each process's VmHWM from /proc.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import safetensors.numpy

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import qflare  # noqa: E402
from conftest import Server, run_in_threads  # noqa: E402

# Five 5000 × 1000 weight matrices and their biases: 25,005,000 parameters.
LAYERS = 5
ROWS, COLS = 5000, 1000


def initial() -> dict:
    rng = np.random.default_rng(0)
    weights = {}
    for i in range(LAYERS):
        weights[f"layer{i}.weight"] = (rng.standard_normal((ROWS, COLS), np.float32) * 0.01)
        weights[f"layer{i}.bias"] = np.zeros(ROWS, np.float32)
    return weights


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def children(pid: int) -> list:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = Server(work, {
            "architecture": "custom", "auto_start": False,
            "clients_per_round": args.devices, "min_updates": args.devices,
            "max_rounds": args.rounds, "round_timeout_secs": 1800, "poll_interval_secs": 1,
            "training": {"learning_rate": 0.01, "batch_size": 32, "epochs": 1},
        })
        try:
            weights = initial()
            path = work / "large.safetensors"
            safetensors.numpy.save_file(weights, str(path))
            model_bytes = path.stat().st_size
            parameters = sum(w.size for w in weights.values())
            del weights
            started = time.monotonic()
            server.admin("model", "init", "--from", str(path), "--name", "large-25m")
            register_secs = time.monotonic() - started
            enclave_pid = children(server.process.pid)[0]
            idle = (rss_mib(server.process.pid), rss_mib(enclave_pid))
            for k in range(args.devices):
                server.enroll(work / f"d{k}", name=f"d{k}")
            server.admin("round", "start")

            def fit(w, config):
                step = np.float32(config["learning_rate"] * 1e-3)
                return {name: value - step for name, value in w.items()}, 100, {}

            started = time.monotonic()
            results = run_in_threads({
                f"d{k}": (lambda k=k: qflare.run_device(
                    fit, identity_dir=str(work / f"d{k}"),
                    enclave_measurements=[server.measurement], allow_software_attestation=True))
                for k in range(args.devices)
            })
            wall = time.monotonic() - started
            failures = {n: r for n, r in results.items() if not isinstance(r, dict)}
            if failures:
                raise SystemExit(f"devices failed: {failures}\n{server.log()[-3000:]}")
            status = server.status()
            rounds = [r for r in status["rounds"] if r["state"] == "completed"]
            server_peak = peak_rss_mib(server.process.pid)
            enclave_peak = peak_rss_mib(enclave_pid)
            device_rounds = [r for res in results.values() for r in res["rounds"]]
            took = [r["closed_at"] - r["opened_at"] for r in rounds]
        finally:
            server.stop()

    print(f"model: {parameters:,} parameters, {model_bytes / 1e6:.1f} MB safetensors; "
          f"registered in {register_secs:.1f} s")
    print(f"{args.devices} devices, {len(rounds)} rounds completed in {wall:.1f} s "
          f"(rounds took {took} s by the server's clock)")
    print(f"per device and round: {np.mean([r['seconds'] for r in device_rounds]):.1f} s total, "
          f"{np.mean([r['training_seconds'] for r in device_rounds]):.1f} s in fit "
          f"(with the tensor conversions)")
    print(f"bytes per round: {args.devices} downloads of {model_bytes / 1e6:.1f} MB, "
          f"{args.devices} sealed updates of about {4 / 3 * model_bytes / 1e6:.1f} MB (base64)")
    print(f"server RSS: idle {idle[0]:.0f} MiB, peak {server_peak:.0f} MiB "
          f"(+{server_peak - idle[0]:.0f} MiB, {(server_peak - idle[0]) / args.devices:.0f} MiB "
          f"per concurrent upload if all {args.devices} overlapped)")
    print(f"enclave RSS: idle {idle[1]:.0f} MiB, peak {enclave_peak:.0f} MiB "
          f"(+{enclave_peak - idle[1]:.0f} MiB)")


if __name__ == "__main__":
    main()
