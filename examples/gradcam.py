"""Grad-CAM heat maps from a running Tapserve: one digit of each class, the digit the
served classifier sees, and where its `cam` endpoint says it looked.

    .venv/bin/tapserve serve &                 # the example models of models/
    .venv/bin/python examples/gradcam.py       # writes docs/images/gradcam.png

Plain HTTP (KServe v2 REST, JSON tensors): no client library needed. Needs the
`examples` extra (scikit-learn for the digits, matplotlib for the picture).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

HERE = Path(__file__).resolve().parent
MODEL = "digits_classifier"
SIZE = (1000, 240)  # pixels of the picture: 10 columns of 100, two rows
DPI = 100


def infer(url: str, model: str, images: np.ndarray) -> dict[str, np.ndarray]:
    """POST /v2/models/<model>/infer with one FP32 input `image`; the outputs as numpy."""
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(images.shape),
                        "data": images.ravel().tolist()}]}
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/infer",
                                     data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    return {o["name"]: np.asarray(o["data"], dtype=np.float32).reshape(o["shape"])
            for o in answer["outputs"]}


def one_of_each_digit() -> np.ndarray:
    """The first image of each digit 0-9 in scikit-learn's digits, (10, 8, 8, 1) in [0, 1]."""
    digits = load_digits()
    first = [int(np.flatnonzero(digits.target == d)[0]) for d in range(10)]
    return (digits.images[first] / 16.0).astype(np.float32)[..., np.newaxis]


def heat_maps(url: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, predicted digits, Grad-CAM maps (10, 8, 8)) as the server answers them."""
    images = one_of_each_digit()
    predicted = infer(url, f"{MODEL}.classify", images)["digit"].argmax(axis=-1)
    cams = infer(url, f"{MODEL}.cam", images)["attribution"]  # no target: the predicted digit
    return images, predicted, cams


def draw(images: np.ndarray, predicted: np.ndarray, cams: np.ndarray, out: Path) -> None:
    """Top row the digits, bottom row each one's Grad-CAM (scaled per image, bright: where
    the model looked) under the digit's outline."""
    fig, axes = plt.subplots(2, len(images), figsize=(SIZE[0] / DPI, SIZE[1] / DPI), dpi=DPI)
    for i, (image, digit, cam) in enumerate(zip(images, predicted, cams, strict=True)):
        axes[0, i].imshow(image[..., 0], cmap="gray_r", vmin=0, vmax=1)
        axes[0, i].set_title(f"sees {digit}", fontsize=9)
        axes[1, i].imshow(cam / (cam.max() or 1), cmap="inferno", vmin=0, vmax=1)
        axes[1, i].contour(image[..., 0], levels=[0.5], colors="white", linewidths=0.8)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.text(0.005, 0.72, "digit", rotation=90, fontsize=9)
    fig.text(0.005, 0.22, "Grad-CAM", rotation=90, fontsize=9)
    fig.subplots_adjust(left=0.02, right=1, top=0.88, bottom=0.01, wspace=0.05, hspace=0.15)
    fig.savefig(out, dpi=DPI, metadata={"Software": None})  # no version: the bytes are stable
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="127.0.0.1:8000", help="Tapserve's HTTP host:port")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "images" / "gradcam.png")
    args = parser.parse_args(argv)
    draw(*heat_maps(args.url), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
