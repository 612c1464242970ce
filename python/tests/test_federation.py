"""Python devices federating a model of their own through a real server and
enclave: learning measured by federated evaluation, the initial model
registered from an F16 file, export and offline verification, and a Rust
device beside a Python one in the same round."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import safetensors.numpy

import qflare
from conftest import SoftmaxDevice, binary, run_in_threads, shards


def federation(**overrides):
    settings = {
        "architecture": "custom",
        "auto_start": True,
        "clients_per_round": 3,
        "min_updates": 3,
        "max_rounds": 4,
        "round_timeout_secs": 120,
        "poll_interval_secs": 1,
        "training": {"learning_rate": 0.5, "batch_size": 32, "epochs": 1},
    }
    settings.update(overrides)
    return settings


def register(server, path: Path, weights, name: str) -> str:
    safetensors.numpy.save_file(weights, str(path))
    return server.admin("model", "init", "--from", str(path), "--name", name)


def test_numpy_devices_learn_and_the_export_verifies(start_server, tmp_path, mnist):
    server = start_server(**federation())
    # Registered in half precision: the enclave widens it to f32.
    half = {k: v.astype(np.float16) for k, v in SoftmaxDevice.initial().items()}
    out = register(server, tmp_path / "softmax.safetensors", half, "mnist-softmax")
    assert "registered mnist-softmax as version 0" in out, out

    devices = shards(mnist, 3, train_per_device=2000, test_per_device=500)
    for k in range(3):
        server.enroll(tmp_path / f"device{k}", name=f"numpy{k}")
    summaries = run_in_threads({
        f"device{k}": (lambda k=k: qflare.run_device(
            devices[k].fit,
            devices[k].evaluate,
            identity_dir=str(tmp_path / f"device{k}"),
            enclave_measurements=[server.measurement],
            allow_software_attestation=True,
        ))
        for k in range(3)
    })
    for name, summary in summaries.items():
        assert isinstance(summary, dict), f"{name}: {summary!r}\n{server.log()}"
        assert [r["round_id"] for r in summary["rounds"]] == [1, 2, 3, 4], summary

    models = {m["version"]: m for m in server.status()["models"]}
    assert sorted(models) == [0, 1, 2, 3, 4]
    # Version v is evaluated by the devices in round v + 1, the last one when
    # training ends; each time on 3 × 500 held-out examples.
    evaluated = {v: m["federated"] for v, m in models.items() if m.get("federated")}
    assert sorted(evaluated) == [0, 1, 2, 3, 4], models
    assert all(e["devices"] == 3 and e["examples"] == 1500 for e in evaluated.values())
    assert evaluated[0]["metrics"]["accuracy"] < 0.2
    # Chance is 0.1; four rounds land at 0.84-0.88 (threaded sums vary).
    assert evaluated[4]["metrics"]["accuracy"] > 0.8, evaluated
    assert evaluated[4]["metrics"]["loss"] < evaluated[0]["metrics"]["loss"]
    table = server.admin("round", "status")
    assert "federated evaluation" in table and "3 devices, 1500 examples" in table, table

    # Export, verify offline, reload in a fresh process: the same tensors.
    exported = tmp_path / "global.safetensors"
    server.admin("model", "export", "--out", str(exported))
    assert (tmp_path / "global.cert.json").exists()
    verified = server.admin("model", "verify", str(exported))
    assert "model mnist-softmax version 4" in verified, verified
    here = safetensors.numpy.load_file(str(exported))
    assert here["linear.weight"].dtype == np.float32 and here["linear.weight"].shape == (10, 784)
    fresh = subprocess.run(
        [sys.executable, "-c",
         "import sys, hashlib, safetensors.numpy as s\n"
         "t = s.load_file(sys.argv[1])\n"
         "print(hashlib.sha256(b''.join(t[k].tobytes() for k in sorted(t))).hexdigest())",
         str(exported)],
        capture_output=True, text=True, check=True,
    )
    import hashlib
    digest = hashlib.sha256(b"".join(here[k].tobytes() for k in sorted(here))).hexdigest()
    assert fresh.stdout.strip() == digest

    flipped = tmp_path / "flipped.safetensors"
    data = bytearray(exported.read_bytes())
    data[-5] ^= 0x01
    flipped.write_bytes(bytes(data))
    (tmp_path / "flipped.cert.json").write_bytes((tmp_path / "global.cert.json").read_bytes())
    try:
        server.admin("model", "verify", str(flipped))
    except AssertionError as err:
        assert "does not match its certificate" in str(err), err
    else:
        raise AssertionError("a flipped byte verified")


def _bad(kind: str, device: SoftmaxDevice):
    def fit(weights, config):
        new, n, metrics = device.fit(weights, config)
        if kind == "wrong_shape":
            new["linear.bias"] = np.zeros(11, np.float32)
        elif kind == "missing":
            del new["linear.bias"]
        elif kind == "extra":
            new["linear.extra"] = np.zeros(3, np.float32)
        elif kind == "nan":
            new["linear.weight"][0, 0] = np.nan
        return new, n, metrics
    return fit


def test_bad_updates_are_refused_by_name_and_the_round_completes(start_server, tmp_path, mnist):
    # Started by hand once all six are enrolled, so the round selects all six.
    server = start_server(**federation(
        auto_start=False, clients_per_round=6, min_updates=2, max_rounds=1,
        round_timeout_secs=15,
    ))
    register(server, tmp_path / "softmax.safetensors", SoftmaxDevice.initial(), "mnist-softmax")
    devices = shards(mnist, 6, train_per_device=500, test_per_device=100)
    kinds = ["honest", "honest", "wrong_shape", "missing", "extra", "nan"]
    for k, kind in enumerate(kinds):
        server.enroll(tmp_path / f"device{k}", name=f"{kind}{k}")
    server.admin("round", "start")
    results = run_in_threads({
        f"{kind}{k}": (lambda k=k, kind=kind: qflare.run_device(
            devices[k].fit if kind == "honest" else _bad(kind, devices[k]),
            identity_dir=str(tmp_path / f"device{k}"),
            enclave_measurements=[server.measurement],
            allow_software_attestation=True,
        ))
        for k, kind in enumerate(kinds)
    })
    expected = {
        "wrong_shape2": (qflare.ShapeMismatch, "tensor linear.bias has shape [11]"),
        "missing3": (qflare.ShapeMismatch, "tensor linear.bias is missing"),
        "extra4": (qflare.ShapeMismatch, "tensor linear.extra is not in the model"),
        "nan5": (qflare.NonFiniteUpdate, "tensor linear.weight holds a NaN"),
    }
    for name, (error, words) in expected.items():
        assert isinstance(results[name], error), f"{name}: {results[name]!r}"
        assert words in str(results[name]), str(results[name])
    for name in ("honest0", "honest1"):
        assert isinstance(results[name], dict), f"{name}: {results[name]!r}\n{server.log()}"
        assert [r["round_id"] for r in results[name]["rounds"]] == [1]
    status = server.status()
    assert [m["version"] for m in status["models"]] == [0, 1], status
    assert status["rounds"][0]["outcome"]["accepted"] == 2, status


def test_registration_is_checked(start_server, tmp_path):
    server = start_server(**federation())
    counters = {"bn.num_batches_tracked": np.array([3], np.int64), **SoftmaxDevice.initial()}
    try:
        register(server, tmp_path / "bn.safetensors", counters, "with-counter")
    except AssertionError as err:
        assert "bn.num_batches_tracked" in str(err) and "I64" in str(err), err
    else:
        raise AssertionError("an integer tensor was registered")
    register(server, tmp_path / "ok.safetensors", SoftmaxDevice.initial(), "mnist-softmax")
    try:
        register(server, tmp_path / "again.safetensors", SoftmaxDevice.initial(), "another")
    except AssertionError as err:
        assert "model_exists" in str(err), err
    else:
        raise AssertionError("a second model was registered")


def _mlp_fit(x, y):
    """One epoch of SGD on the built-in mnist-2nn (784-200-200-10, ReLU), in NumPy."""

    def fit(weights, config):
        w = {k: v.astype(np.float32).copy() for k, v in weights.items()}
        rng = np.random.default_rng(config["seed"])
        lr, batch = config["learning_rate"], config["batch_size"]
        order = rng.permutation(len(y))
        for start in range(0, len(order), batch):
            i = order[start:start + batch]
            h1 = np.maximum(0, x[i] @ w["fc1.weight"].T + w["fc1.bias"])
            h2 = np.maximum(0, h1 @ w["fc2.weight"].T + w["fc2.bias"])
            logits = h2 @ w["fc3.weight"].T + w["fc3.bias"]
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(len(i)), y[i]] -= 1.0
            g3 = p / len(i)
            g2 = (g3 @ w["fc3.weight"]) * (h2 > 0)
            g1 = (g2 @ w["fc2.weight"]) * (h1 > 0)
            w["fc3.weight"] -= lr * g3.T @ h2
            w["fc3.bias"] -= lr * g3.sum(axis=0)
            w["fc2.weight"] -= lr * g2.T @ h1
            w["fc2.bias"] -= lr * g2.sum(axis=0)
            w["fc1.weight"] -= lr * g1.T @ x[i]
            w["fc1.bias"] -= lr * g1.sum(axis=0)
        return w, len(y), {}

    return fit


def test_a_rust_device_and_a_python_device_share_a_round(start_server, tmp_path, mnist):
    server = start_server(**federation(
        architecture="mnist-2nn", clients_per_round=2, min_updates=2, max_rounds=1,
        training={"learning_rate": 0.05, "batch_size": 20, "epochs": 1},
    ))
    x, y, _, _ = mnist
    server.enroll(tmp_path / "python", name="python")
    rust_identity = tmp_path / "rust"
    edge = str(binary("qflare-edge"))
    subprocess.run(
        [edge, "--identity", str(rust_identity), "enroll", "--server", server.url,
         "--token", server.token(), "--server-key", server.fingerprint, "--name", "rust"],
        check=True, capture_output=True, timeout=120,
    )
    import os
    rust = subprocess.Popen(
        [edge, "--identity", str(rust_identity), "run", "--data", os.environ["QFLARE_DATA_DIR"],
         "--examples", "600", "--enclave-measurement", server.measurement,
         "--allow-software-attestation"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    summary = qflare.run_device(
        _mlp_fit(x[1000:1600], y[1000:1600]),
        identity_dir=str(tmp_path / "python"),
        enclave_measurements=[server.measurement],
        allow_software_attestation=True,
    )
    output, _ = rust.communicate(timeout=300)
    assert rust.returncode == 0, output
    assert [r["round_id"] for r in summary["rounds"]] == [1], summary
    status = server.status()
    assert status["rounds"][0]["submitted"] == 2, status
    assert status["rounds"][0]["outcome"]["accepted"] == 2, status
