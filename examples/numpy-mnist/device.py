"""One device: softmax regression on its own slice of MNIST, in NumPy only.

Usage: python device.py IDENTITY_DIR DEVICE_INDEX   (MNIST from QFLARE_DATA_DIR)
"""
import gzip, os, sys
import numpy as np
import qflare

def idx(name):
    with gzip.open(os.path.join(os.environ["QFLARE_DATA_DIR"], name)) as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)

k = int(sys.argv[2])
x = idx("train-images-idx3-ubyte.gz").reshape(-1, 784)[k * 5000:(k + 1) * 5000] / np.float32(255)
y = idx("train-labels-idx1-ubyte.gz")[k * 5000:(k + 1) * 5000].astype(int)
xt = idx("t10k-images-idx3-ubyte.gz").reshape(-1, 784)[k * 1000:(k + 1) * 1000] / np.float32(255)
yt = idx("t10k-labels-idx1-ubyte.gz")[k * 1000:(k + 1) * 1000].astype(int)

def probabilities(w, x):
    z = x @ w["linear.weight"].T + w["linear.bias"]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True)

def fit(weights, config):
    w, lr, batch = dict(weights), config["learning_rate"], config["batch_size"]
    order = np.random.default_rng(config["seed"]).permutation(len(y))
    for start in range(0, len(y), batch):
        i = order[start:start + batch]
        g = probabilities(w, x[i]); g[np.arange(len(i)), y[i]] -= 1
        w["linear.weight"] = w["linear.weight"] - lr * g.T @ x[i] / len(i)
        w["linear.bias"] = w["linear.bias"] - lr * g.mean(axis=0)
    return w, len(y), {}

def evaluate(weights, config):
    p = probabilities(weights, xt)
    loss = -np.log(p[np.arange(len(yt)), yt] + 1e-12).mean()
    return loss, len(yt), {"accuracy": (p.argmax(axis=1) == yt).mean()}

summary = qflare.run_device(fit, evaluate, identity_dir=sys.argv[1],
                            enclave_measurements=[os.environ["QFLARE_ENCLAVE_MEASUREMENT"]],
                            allow_software_attestation=True)
print(f"device {k}: {len(summary['rounds'])} rounds submitted")
