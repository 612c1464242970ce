"""The PyTorch path: a `torch.nn.Module` federated through `qflare.torch`'s
state-dict helpers, and the exported global model loaded back with
`safetensors.torch.load_file` + `load_state_dict`. Skipped, saying so, when
PyTorch is not installed (its wheel is large; CI may not carry it)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed: the PyTorch path is not tested")

import qflare  # noqa: E402
import qflare.torch  # noqa: E402
from conftest import shards  # noqa: E402


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 5, padding=2)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8 * 14 * 14, 10)

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(x.flatten(1))


def test_a_torch_model_federates_and_loads_back(start_server, tmp_path, mnist):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    server = start_server(
        architecture="custom", auto_start=True, clients_per_round=2, min_updates=2,
        max_rounds=2, round_timeout_secs=120, poll_interval_secs=1,
        training={"learning_rate": 0.05, "batch_size": 32, "epochs": 1},
    )
    initial = tmp_path / "net.safetensors"
    qflare.torch.save_initial_model(Net(), str(initial))
    server.admin("model", "init", "--from", str(initial), "--name", "torch-net")
    data = shards(mnist, 2, train_per_device=600, test_per_device=200)
    for k in range(2):
        server.enroll(tmp_path / f"d{k}")

    def device(k):
        net = Net()
        x = torch.from_numpy(data[k].x).reshape(-1, 1, 28, 28)
        y = torch.from_numpy(data[k].y)

        def fit(weights, config):
            qflare.torch.load_weights(net, weights)
            opt = torch.optim.SGD(net.parameters(), lr=config["learning_rate"])
            net.train()
            for start in range(0, len(y), config["batch_size"]):
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(
                    net(x[start:start + config["batch_size"]]), y[start:start + config["batch_size"]])
                loss.backward()
                opt.step()
            return qflare.torch.state_dict_to_weights(net), len(y), {"loss": loss.item()}

        return qflare.run_device(fit, identity_dir=str(tmp_path / f"d{k}"),
                                 enclave_measurements=[server.measurement],
                                 allow_software_attestation=True)

    from conftest import run_in_threads
    results = run_in_threads({f"d{k}": (lambda k=k: device(k)) for k in range(2)})
    assert all(isinstance(r, dict) for r in results.values()), results
    exported = tmp_path / "global.safetensors"
    server.admin("model", "export", "--out", str(exported))
    fresh = Net()
    exported_tensors = load_file(str(exported))
    # Strict: every floating tensor is there; BatchNorm itself fills in the
    # integer num_batches_tracked the federation leaves out.
    fresh.load_state_dict(exported_tensors)
    assert "bn.num_batches_tracked" not in exported_tensors
    for name, tensor in qflare.torch.state_dict_to_weights(fresh).items():
        assert (torch.from_numpy(tensor) == exported_tensors[name]).all(), name
    # Federated training moved the weights away from the initial model.
    initial_tensors = load_file(str(initial))
    assert not torch.equal(initial_tensors["fc.weight"], exported_tensors["fc.weight"])
