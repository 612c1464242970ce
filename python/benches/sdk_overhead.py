"""What the Python SDK adds to a device's round, against the Rust device on the
same model (the built-in MNIST CNN, 1,663,370 parameters), measured in one run.

    QFLARE_BIN_DIR=target/release QFLARE_DATA_DIR=.../mnist python python/benches/sdk_overhead.py [--rounds 3]

Both devices run the same loop (the edge library) in the same rounds. The
Rust device (`qflare-edge run`) trains the CNN with burn on 600 examples; the
Python device's `fit` returns the weights it was given, so everything its
round costs beyond the user's own code is the SDK: handing the verified
model to Python (safetensors bytes, `safetensors.numpy`), taking the weights
back, the checks and the delta in Rust, and the GIL handoffs. Reported per
round: each device's round time (the loop's own timings, without polling
waits) and its part outside training (the same loop code for both, so it
differs only by noise and by the two devices sharing the CPU), and the SDK's
own work — the Python device's time in the trainer outside the user's
`fit` — as a share of the Rust device's round.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import qflare  # noqa: E402
from conftest import Server, binary  # noqa: E402

UNITS = {"ms": 1e-3, "s": 1.0}


def seconds(text: str) -> float:
    value, unit = text.split()
    return float(value) * UNITS[unit]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--examples", type=int, default=600)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        server = Server(work, {
            "architecture": "mnist-cnn", "auto_start": False, "clients_per_round": 2,
            "min_updates": 2, "max_rounds": args.rounds, "round_timeout_secs": 600,
            "poll_interval_secs": 1,
            "training": {"learning_rate": 0.05, "batch_size": 20, "epochs": 1},
        })
        try:
            server.enroll(work / "python", name="python")
            edge = str(binary("qflare-edge"))
            subprocess.run(
                [edge, "--identity", str(work / "rust"), "enroll", "--server", server.url,
                 "--token", server.token(), "--server-key", server.fingerprint],
                check=True, capture_output=True)
            server.admin("round", "start")
            rust = subprocess.Popen(
                [edge, "--identity", str(work / "rust"), "run", "--data",
                 os.environ["QFLARE_DATA_DIR"], "--examples", str(args.examples),
                 "--enclave-measurement", server.measurement, "--allow-software-attestation"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            user_fit = []

            def fit(weights, config):
                started = time.perf_counter()
                result = (weights, args.examples, {})
                user_fit.append(time.perf_counter() - started)
                return result

            summary = qflare.run_device(fit, identity_dir=str(work / "python"),
                                        enclave_measurements=[server.measurement],
                                        allow_software_attestation=True)
            output, _ = rust.communicate(timeout=1200)
        finally:
            server.stop()
    rust_rounds = [(seconds(m[0]), seconds(m[1])) for m in
                   re.findall(r"; (\S+ m?s) total, training (\S+ m?s)", output)]
    if len(rust_rounds) != args.rounds:
        raise SystemExit(f"the Rust device reported {len(rust_rounds)} rounds:\n{output}")
    print("round  rust: round (training, rest)        python: round (rest)   "
          "SDK conversions   share of rust round")
    shares = []
    for k, (py, (rust_total, rust_training)) in enumerate(zip(summary["rounds"], rust_rounds)):
        sdk = py["training_seconds"] - user_fit[k]
        shares.append(sdk / rust_total)
        print(f"{py['round_id']:5}  {rust_total:6.3f} s ({rust_training:.3f} s, "
              f"{rust_total - rust_training:.3f} s)   {py['seconds']:6.3f} s "
              f"({py['seconds'] - user_fit[k]:.3f} s)   {sdk:10.3f} s   {100 * shares[-1]:12.2f} %")
    print(f"mean SDK share of a Rust device's CNN round: {100 * sum(shares) / len(shares):.2f} %")


if __name__ == "__main__":
    main()
