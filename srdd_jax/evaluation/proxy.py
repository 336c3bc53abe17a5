"""Offline proxy metrics in the feature space of the project's own classifier (SPEC §9).

    clf = classifier.train_or_load(config.data, image_size, f'{workdir}/proxy_classifier')
    real, _ = classifier.held_out_images(clf, config.data)
    proxy_metrics(clf, real, samples, sample_labels)
    # {'fd_cnn_fashion_mnist_32px': ..., 'class_consistency': ..., 'classifier_test_accuracy': ...}

`fd_<classifier>` is the Fréchet distance between Gaussians fitted to the classifier's penultimate
features of held-out real images and of samples (metrics.frechet_distance, float64). It is not an FID
and must never be reported as one: its scale depends on this classifier, so numbers compare only
between runs that used the same classifier (the same cache key, `classifier.key`).
`class_consistency` is the share of class-conditional samples that the classifier assigns to the class
they were generated for; read it next to `classifier_test_accuracy`, its value on real images.
"""
from __future__ import annotations

import numpy as np

from srdd_jax.evaluation import metrics, stats
from srdd_jax.evaluation.classifier import ProxyClassifier, agreement


PR_K = 3  # Neighbours of the k-NN manifolds of precision and recall (Kynkäänniemi et al.'s default).


def fd_name(classifier: ProxyClassifier) -> str:
  """The metric's name, e.g. 'fd_cnn_fashion_mnist_32px': the classifier and the resolution it was
  trained at, since classifiers of two resolutions give numbers that do not compare."""
  return f'fd_{classifier.name}_{int(classifier.info["request"]["image_size"])}px'


def features(classifier: ProxyClassifier, images, *, batch_size: int = 256, what: str = 'images') -> np.ndarray:
  """The classifier's features of NHWC images (uint8, or float in [0, 1]); at least 2, for a covariance."""
  _, feats = classifier.outputs(images, batch_size=batch_size, what=what)
  if len(feats) < 2:
    raise ValueError(f'{what}: a covariance needs at least 2 images, got {len(feats)}')
  return feats


def feature_statistics(classifier: ProxyClassifier, images, *, batch_size: int = 256,
                       what: str = 'images') -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) float64 of the classifier's features of NHWC images (uint8, or float in [0, 1])."""
  return stats.feature_statistics(features(classifier, images, batch_size=batch_size, what=what))


def class_consistency(classifier: ProxyClassifier, images, labels, *, batch_size: int = 256,
                      what: str = 'samples') -> float:
  """Share of `images` that the classifier assigns to `labels` (its accuracy, on real images)."""
  logits, _ = classifier.outputs(images, batch_size=batch_size, what=what)
  labels = classifier.check_labels(labels, len(logits), f'{what} labels')
  return agreement(np.argmax(logits, axis=-1), labels)


def proxy_metrics(classifier: ProxyClassifier, real_images, samples, sample_labels=None, *,
                  real_stats: tuple[np.ndarray, np.ndarray] | None = None,
                  real_features: np.ndarray | None = None, batch_size: int = 256) -> dict[str, float]:
  """{'fd_<name>', 'class_consistency' (only with sample_labels), 'classifier_test_accuracy'}.

  real_images: held-out real images (e.g. held_out_images), or None with `real_stats` = their
  (mu, sigma) from feature_statistics, computed once. samples: NHWC uint8, or float in [0, 1], at the
  classifier's image size; sample_labels: the classes they were conditioned on (None: unconditional
  samples, no consistency). Features of the samples are computed once for every metric. With
  `real_features` (the real images' classifier features) also improved precision and recall (k = 3,
  Kynkäänniemi et al. 2019) in the same feature space: how many samples lie on the real manifold, and
  how much of it the samples cover.
  """
  if real_stats is None:
    if real_images is None:
      raise ValueError('proxy_metrics needs real_images or real_stats')
    real_stats = feature_statistics(classifier, real_images, batch_size=batch_size, what='real images')
  logits, feats = classifier.outputs(samples, batch_size=batch_size, what='samples')
  if len(feats) < 2:
    raise ValueError(f'samples: a covariance needs at least 2 images, got {len(feats)}')
  mu, sigma = stats.feature_statistics(feats)
  out = {fd_name(classifier): metrics.frechet_distance(real_stats[0], real_stats[1], mu, sigma)}
  if sample_labels is not None:
    labels = classifier.check_labels(sample_labels, len(logits), 'sample labels')
    out['class_consistency'] = agreement(np.argmax(logits, axis=-1), labels)
  if real_features is not None:
    out.update(metrics.precision_recall(real_features, feats, k=PR_K))
  out['classifier_test_accuracy'] = classifier.accuracy
  return out
