"""TFDS builder `synthetic_domains`: sequences from latent domains, with labels.

Ground truth for expert specialisation: each of `NUM_DOMAINS` domains is its own
first-order Markov chain over a partly shared vocabulary of byte values.

  shared tokens   SHARED_TOKENS byte values every domain uses
  own tokens      OWN_TOKENS byte values of the domain alone
  transitions     each token of the domain's support moves to BRANCHING successors
                  drawn from the support, with Dirichlet(0.5) probabilities

A sequence picks its domain uniformly, starts at a random token of the domain's
support, and walks the chain for a length uniform in [MIN_LENGTH, MAX_LENGTH]
(all sequences of a split are walked in lockstep, vectorised).
Everything comes from one fixed seed, so the dataset is the same on every
machine. Features: `text` (the byte values, uint8[length]) and `domain` (int).
The optimal next-token loss of a domain is the entropy rate of its chain,
recorded per domain in the builder's metadata (`entropy_rate_nats`).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

NUM_DOMAINS = 8
SHARED_TOKENS = 16
OWN_TOKENS = 24
BRANCHING = 4
MIN_LENGTH, MAX_LENGTH = 256, 1024
NUM_EXAMPLES = {"train": 8000, "validation": 400}
SEED = 20240501
# Printable ASCII keeps samples readable: shared tokens first, then each domain's own.
ALPHABET = np.arange(33, 33 + SHARED_TOKENS + NUM_DOMAINS * OWN_TOKENS, dtype=np.int64)


class DomainChain:
  """The Markov chain of one domain: `support` [S] byte values, `transitions` [S, S]."""

  def __init__(self, domain: int, rng: np.random.Generator):
    own = ALPHABET[SHARED_TOKENS + domain * OWN_TOKENS:SHARED_TOKENS + (domain + 1) * OWN_TOKENS]
    self.support = np.concatenate([ALPHABET[:SHARED_TOKENS], own]).astype(np.uint8)
    size = len(self.support)
    self.transitions = np.zeros((size, size))
    for state in range(size):
      successors = rng.choice(size, BRANCHING, replace=False)
      self.transitions[state, successors] = rng.dirichlet(np.full(BRANCHING, 0.5))

  def entropy_rate(self) -> float:
    """Entropy rate in nats/token under the chain's stationary distribution."""
    values, vectors = np.linalg.eig(self.transitions.T)
    stationary = np.abs(np.real(vectors[:, np.argmin(np.abs(values - 1))]))
    stationary /= stationary.sum()
    p = self.transitions
    row_entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=1)
    return float(stationary @ row_entropy)


def domain_chains() -> list[DomainChain]:
  rng = np.random.default_rng(SEED)
  return [DomainChain(d, rng) for d in range(NUM_DOMAINS)]


def sample_split(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """All sequences of a split, walked in lockstep: byte values [N, MAX_LENGTH],
  lengths [N] and domains [N]."""
  chains = domain_chains()
  rng = np.random.default_rng([SEED, 1 if split == "train" else 2])
  count = NUM_EXAMPLES[split]
  domains = rng.integers(NUM_DOMAINS, size=count)
  lengths = rng.integers(MIN_LENGTH, MAX_LENGTH + 1, size=count)
  support_size = SHARED_TOKENS + OWN_TOKENS
  cumulative = np.stack([np.cumsum(c.transitions, axis=1) for c in chains])  # [G, S, S]
  states = np.empty((count, MAX_LENGTH), np.int64)
  states[:, 0] = rng.integers(support_size, size=count)
  draws = rng.random((count, MAX_LENGTH))
  for i in range(1, MAX_LENGTH):
    rows = cumulative[domains, states[:, i - 1]]                          # [N, S]
    states[:, i] = np.minimum((rows < draws[:, i:i + 1]).sum(axis=1), support_size - 1)
  supports = np.stack([c.support for c in chains])                        # [G, S]
  return supports[domains[:, None], states], lengths, domains


class SyntheticDomains(tfds.core.GeneratorBasedBuilder):
  """Markov-chain sequences from latent domains, labelled with their domain."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "8 domains, first-order chains over partly shared bytes."}

  def _info(self) -> tfds.core.DatasetInfo:
    rates = [round(c.entropy_rate(), 6) for c in domain_chains()]
    return self.dataset_info_from_configs(
        description="Sequences from 8 latent Markov-chain domains, with the domain id.",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Tensor(shape=(None,), dtype=np.uint8),
            "domain": tfds.features.ClassLabel(num_classes=NUM_DOMAINS),
        }),
        metadata=tfds.core.MetadataDict(entropy_rate_nats=rates),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in NUM_EXAMPLES}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    values, lengths, domains = sample_split(split)
    for index in range(len(lengths)):
      yield index, {"text": values[index, :lengths[index]], "domain": int(domains[index])}
