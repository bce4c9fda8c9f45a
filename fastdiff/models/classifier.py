"""The quality metric of the digits model: a small digit classifier and "FD-digits".

- accuracy: the fraction of generated samples that the classifier assigns to the requested label;
- FD-digits: the Frechet distance between Gaussian fits of the classifier's penultimate features
  of generated samples and of real held-out digits (the FID construction of Heusel et al. 2017,
  arXiv:1706.08500, Eq. 6, with this classifier in place of Inception):

      FD = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr (S_1^(1/2) S_2 S_1^(1/2))^(1/2).

The classifier is trained (`fastdiff train classifier`) on the "train" split of
`fastdiff.models.digits.load_dataset` only; the "test" split (never seen by it nor by the diffusion
model) measures its accuracy and supplies the real features. Weights:
`fastdiff/weights/digits_classifier.safetensors`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DigitClassifier", "CLASSIFIER_WEIGHTS", "load_classifier", "gaussian_stats",
           "frechet_distance", "evaluate_digits"]

CLASSIFIER_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / \
    "digits_classifier.safetensors"
CLASSIFIER_COMMAND = "fastdiff train classifier"


class DigitClassifier(nn.Module):
    """conv3x3(32) -> ReLU -> conv3x3(64) -> ReLU -> maxpool 2 -> Linear(64) -> ReLU [features]
    -> Linear(10). Input [B, 1, 8, 8] in [-1, 1]."""

    def __init__(self, width: int = 32, features: int = 64, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 16, features)
        self.fc2 = nn.Linear(features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features [B, features] (the FD-digits embedding)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"x must be [B, 1, 8, 8] digits in [-1, 1], got {tuple(x.shape)}")
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return F.relu(self.fc1(F.max_pool2d(h, 2).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.features(x))


def load_classifier(device=None, path: str | Path | None = None) -> DigitClassifier:
    """The shipped classifier (float32, eval mode, no grad)."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else CLASSIFIER_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights not found at {path}; make them with "
                                f"`{CLASSIFIER_COMMAND}`")
    model = DigitClassifier()
    model.load_state_dict(load_file(str(path)))
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def _features_and_logits(model: DigitClassifier, x: Tensor) -> tuple[np.ndarray, Tensor]:
    p = next(model.parameters())
    feats = model.features(x.detach().to(p.device, p.dtype).clamp(-1, 1))
    return feats.double().cpu().numpy(), model.fc2(feats)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [d], covariance [d, d]) of features [n, d] (unbiased covariance), float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [n >= 2, d], got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix by eigendecomposition (round-off
    negative eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, s1, mu2, s2) -> float:
    """Frechet distance of N(mu1, s1) and N(mu2, s2) (Dowson & Landau 1982).

    tr (s1^(1/2) s2 s1^(1/2))^(1/2) is the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix s1^(1/2) s2 s1^(1/2) (same spectrum as s1 s2), so only symmetric
    eigendecompositions are needed: no non-symmetric sqrtm and its complex round-off.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(s1, np.float64), np.asarray(s2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, "
                         f"covariances {s1.shape} / {s2.shape}")
    r1 = _psd_sqrt(s1)
    m = r1 @ s2 @ r1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * cross)


def real_stats(model: DigitClassifier, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Gaussian fit of the classifier features of the real digits of `split` (cached on the
    model)."""
    from fastdiff.models.digits import load_dataset

    cache = model.__dict__.setdefault("_real_stats", {})
    if split not in cache:
        x, _ = load_dataset(split)
        cache[split] = gaussian_stats(_features_and_logits(model, x)[0])
    return cache[split]


def evaluate_digits(samples: Tensor, labels: Tensor | None = None,
                    classifier: DigitClassifier | None = None,
                    reference: str = "test") -> dict[str, float]:
    """Quality of digits [N, 1, 8, 8] in [-1, 1]: "fd" (FD-digits against the real `reference`
    split) and, with labels [N], "accuracy" (fraction classified as their label)."""
    model = classifier if classifier is not None else load_classifier()
    feats, logits = _features_and_logits(model, samples)
    out = {"fd": frechet_distance(*gaussian_stats(feats), *real_stats(model, reference)),
           "n": float(len(feats))}
    if labels is not None:
        labels = torch.as_tensor(labels).reshape(-1).to(logits.device)
        if labels.shape[0] != logits.shape[0]:
            raise ValueError(f"labels must have one entry per sample ({logits.shape[0]}), got "
                             f"{labels.shape[0]}")
        out["accuracy"] = float((logits.argmax(1) == labels).double().mean())
    return out
