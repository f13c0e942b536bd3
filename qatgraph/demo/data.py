"""Demo data sets with no download: MNIST-1D (the ``mnist1d`` package generates it locally; the
default, hard enough that low-bit PTQ loses accuracy), scikit-learn's bundled handwritten digits,
or CIFAR-10 from its standard python-pickle files for users who have them."""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

from qatgraph.atomic_files import write_bytes
from qatgraph.errors import QatgraphError


@dataclass
class DemoData:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    def train_batches(self, batch_size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.train_x), generator=torch.Generator().manual_seed(seed))
        return [(self.train_x[order[i:i + batch_size]], self.train_y[order[i:i + batch_size]])
                for i in range(0, len(order), batch_size)]

    def test_batches(self, batch_size: int = 256) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(self.test_x[i:i + batch_size], self.test_y[i:i + batch_size])
                for i in range(0, len(self.test_x), batch_size)]


def load_digits_data(test_fraction: float = 0.25, seed: int = 0) -> DemoData:
    """The 1797 8x8 digits bundled with scikit-learn, a fixed stratified split, scaled to [0, 1]
    and normalized with the training mean/std."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise QatgraphError("the digits demo needs scikit-learn: pip install 'qatgraph[demo]'") from None
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    train_x, test_x, train_y, test_y = train_test_split(images, digits.target, test_size=test_fraction,
                                                        random_state=seed, stratify=digits.target)
    mean, std = train_x.mean(), train_x.std()
    as_tensor = lambda a: torch.from_numpy((a - mean) / std).unsqueeze(1)  # noqa: E731
    return DemoData("digits", as_tensor(train_x), torch.from_numpy(train_y).long(), as_tensor(test_x),
                    torch.from_numpy(test_y).long(), 10)


def load_cifar10_data(data_dir: str) -> DemoData:
    """CIFAR-10 from ``data_batch_1..5`` and ``test_batch`` (the python-pickle release)."""
    if not data_dir or not os.path.isdir(data_dir):
        raise QatgraphError(f"--data-dir {data_dir!r} is not a directory; point it at the extracted "
                            "cifar-10-batches-py folder (data_batch_1..5, test_batch)")

    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        path = os.path.join(data_dir, name)
        if not os.path.exists(path):
            raise QatgraphError(f"{path} is missing: --data-dir must hold data_batch_1..5 and test_batch")
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="latin1")
        return batch["data"].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0, np.asarray(batch["labels"])

    parts = [read(f"data_batch_{i}") for i in range(1, 6)]
    train_x, train_y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    test_x, test_y = read("test_batch")
    mean = train_x.mean(axis=(0, 2, 3), keepdims=True)
    std = train_x.std(axis=(0, 2, 3), keepdims=True)
    normalize = lambda a: torch.from_numpy((a - mean) / std)  # noqa: E731
    return DemoData("cifar10", normalize(train_x), torch.from_numpy(train_y).long(), normalize(test_x),
                    torch.from_numpy(test_y).long(), 10)


def _cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "qatgraph")


def load_mnist1d_data(seed: int = 42, cache_dir: str | None = None) -> DemoData:
    """MNIST-1D (Greydanus 2020): 4000 train / 1000 test sequences of 40 samples, the ten digits
    as 1-D templates padded, shifted, scaled, sheared and noised. Generated locally by the
    ``mnist1d`` package (no download) with its default arguments and ``seed``; the result is
    cached (written atomically) under ``$XDG_CACHE_HOME/qatgraph`` (``~/.cache/qatgraph``)."""
    path = os.path.join(cache_dir or _cache_dir(), f"mnist1d_seed{seed}.pkl")
    data = None
    if os.path.exists(path):
        try:
            with open(path, "rb") as handle:
                data = pickle.load(handle)
        except (OSError, pickle.UnpicklingError, EOFError):
            data = None  # a damaged cache: generate it again
    if data is None:
        try:
            from mnist1d.data import get_dataset_args, make_dataset
        except ImportError:
            raise QatgraphError("the mnist1d demo needs the mnist1d package: pip install 'qatgraph[demo]' "
                                "(or run the demo with --data digits)") from None
        args = get_dataset_args()
        args.seed = seed
        raw = make_dataset(args)
        data = {key: np.asarray(raw[key]) for key in ("x", "y", "x_test", "y_test")}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_bytes(path, pickle.dumps(data), "mnist1d cache")
    train_x, test_x = data["x"].astype(np.float32), data["x_test"].astype(np.float32)
    mean, std = train_x.mean(), train_x.std()
    as_tensor = lambda a: torch.from_numpy((a - mean) / std).unsqueeze(1)  # noqa: E731
    return DemoData("mnist1d", as_tensor(train_x), torch.from_numpy(data["y"]).long(), as_tensor(test_x),
                    torch.from_numpy(data["y_test"]).long(), 10)
