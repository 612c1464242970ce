"""The server's privacy accountant against Google's ``dp-accounting``.

QFLARE's RDP accountant for the Poisson-subsampled Gaussian mechanism is its
own Rust code (``crates/qflare-enclave/src/privacy/accountant.rs``); this
test runs it through ``qflare privacy epsilon --json`` on a grid of (noise
multiplier, sampling rate, rounds, δ) and requires ε within 1% of
``dp_accounting.rdp.RdpAccountant`` with ``PoissonSampledDpEvent(q,
GaussianDpEvent(z))`` composed ``rounds`` times. It skips, saying so, where
``dp-accounting`` is not installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import itertools
import json
import subprocess

import pytest

from conftest import binary

dp_accounting = pytest.importorskip(
    "dp_accounting", reason="dp-accounting is not installed (pip install dp-accounting)")

NOISE = [0.5, 0.8, 1.0, 2.0, 5.0]
SAMPLING = [0.001, 0.01, 0.1, 0.5, 1.0]
ROUNDS = [1, 20, 500]
DELTAS = [1e-5, 1e-7]


def reference_epsilon(noise: float, q: float, rounds: int, delta: float) -> float:
    accountant = dp_accounting.rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise))
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))


def qflare_epsilon(noise: float, q: float, rounds: int, delta: float) -> float:
    out = subprocess.run(
        [str(binary("qflare")), "privacy", "epsilon", "--noise-multiplier", repr(noise),
         "--sampling-rate", repr(q), "--rounds", str(rounds), "--delta", repr(delta), "--json"],
        check=True, capture_output=True, text=True)
    return float(json.loads(out.stdout)["epsilon"])


def test_accountant_agrees_with_dp_accounting_within_one_percent():
    cases = list(itertools.product(NOISE, SAMPLING, ROUNDS, DELTAS))
    misses = []
    for noise, q, rounds, delta in cases:
        expected = reference_epsilon(noise, q, rounds, delta)
        got = qflare_epsilon(noise, q, rounds, delta)
        if abs(got - expected) > 0.01 * expected + 1e-12:
            misses.append(f"z={noise} q={q} T={rounds} δ={delta}: {got} vs {expected}")
    assert not misses, f"{len(misses)} of {len(cases)} cases differ by over 1%:\n" + "\n".join(misses)


def test_calibrated_noise_meets_the_target_by_the_reference():
    out = subprocess.run(
        [str(binary("qflare")), "privacy", "calibrate", "--epsilon", "3", "--sampling-rate",
         "0.05", "--rounds", "100", "--delta", "1e-5", "--json"],
        check=True, capture_output=True, text=True)
    noise = float(json.loads(out.stdout)["noise_multiplier"])
    assert reference_epsilon(noise, 0.05, 100, 1e-5) <= 3.0 * 1.01
    assert reference_epsilon(noise * 0.98, 0.05, 100, 1e-5) > 3.0
