"""One device: a small CNN on its own slice of Fashion-MNIST, in PyTorch.

Usage: python device.py IDENTITY_DIR DEVICE_INDEX   (Fashion-MNIST from QFLARE_DATA_DIR)
       python device.py --initial FILE              (writes the initial model)
       python device.py --load FILE                 (loads an exported model into Net)
"""
import gzip, os, sys
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
import qflare, qflare.torch

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 16, 5, padding=2), nn.Conv2d(16, 32, 5, padding=2)
        self.fc1, self.fc2 = nn.Linear(32 * 7 * 7, 128), nn.Linear(128, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))

def idx(name, k, n):
    with gzip.open(os.path.join(os.environ["QFLARE_DATA_DIR"], name)) as f:
        data = f.read()
    dims, offset = data[3], 4 + 4 * data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return torch.from_numpy(np.frombuffer(data, np.uint8, offset=offset).reshape(shape)[k * n:(k + 1) * n].copy())

if sys.argv[1] == "--initial":
    torch.manual_seed(0)
    sys.exit(qflare.torch.save_initial_model(Net(), sys.argv[2]))
if sys.argv[1] == "--load":
    from safetensors.torch import load_file
    Net().load_state_dict(load_file(sys.argv[2]))
    sys.exit(print(f"{sys.argv[2]} loads into Net with load_state_dict"))

k, net = int(sys.argv[2]), Net()
x, y = idx("train-images-idx3-ubyte.gz", k, 10000).float().div(255).unsqueeze(1), idx("train-labels-idx1-ubyte.gz", k, 10000).long()
xt, yt = idx("t10k-images-idx3-ubyte.gz", k, 2000).float().div(255).unsqueeze(1), idx("t10k-labels-idx1-ubyte.gz", k, 2000).long()

def fit(weights, config):
    qflare.torch.load_weights(net, weights)
    opt = torch.optim.SGD(net.parameters(), lr=config["learning_rate"], momentum=0.9)
    for _ in range(config["epochs"]):
        for i in torch.randperm(len(y)).split(config["batch_size"]):
            opt.zero_grad(); F.cross_entropy(net(x[i]), y[i]).backward(); opt.step()
    return qflare.torch.state_dict_to_weights(net), len(y), {}

def evaluate(weights, config):
    qflare.torch.load_weights(net, weights)
    with torch.no_grad():
        logits = net(xt)
    return F.cross_entropy(logits, yt).item(), len(yt), {"accuracy": (logits.argmax(1) == yt).float().mean().item()}

qflare.run_device(fit, evaluate, identity_dir=sys.argv[1],
                  enclave_measurements=[os.environ["QFLARE_ENCLAVE_MEASUREMENT"]], allow_software_attestation=True)
