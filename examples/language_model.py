"""Geometric complexity of a small transformer on token ids, at its embeddings.

Run it (about ten seconds on a laptop CPU)::

    python examples/language_model.py

Token ids are integers, so GC is taken with respect to the embedding's output:
``wrt="embed"`` names the submodule. The script measures GC exactly and with one
Rademacher probe per sample, then trains the same classifier twice with
:func:`geocomplexity.training.fit`: without a penalty, and with
``GeometricComplexity(λ, wrt="embed")``, which also reaches the embedding
weights. It prints the GC at the embeddings and the test accuracy of both runs.

The task is synthetic: label a sequence 1 when most of its tokens come from the
lower half of the vocabulary.
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn

import geocomplexity as gcx
from geocomplexity.regularizers import GeometricComplexity
from geocomplexity.training import fit

VOCAB, LENGTH, WIDTH = 20, 8, 16


class TinyTransformer(nn.Module):
    """Embedding, a learned position table, one encoder layer, mean pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Parameter(0.1 * torch.randn(LENGTH, WIDTH))
        layer = nn.TransformerEncoderLayer(WIDTH, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(WIDTH, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``(B, 2)`` of token ids ``(B, LENGTH)``."""
        h = self.encoder(self.embed(tokens) + self.pos)
        return self.head(h.mean(1))


def data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` random sequences and their majority-of-low-tokens labels."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    labels = ((tokens < VOCAB // 2).sum(1) > LENGTH // 2).long()
    return tokens, labels


def main(argv: list[str] | None = None) -> dict[float, tuple[float, float]]:
    """Run the example; returns ``{strength: (GC at the embeddings, test acc)}``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--strength", type=float, default=0.1)
    args = parser.parse_args(argv)

    train, test = data(512, seed=0), data(256, seed=1)
    torch.manual_seed(0)
    model = TinyTransformer()
    exact = gcx.measure(model, train[0], wrt="embed", method="exact", progress=False)
    g = torch.Generator().manual_seed(0)
    probe = gcx.measure(
        model, train[0], wrt="embed", method="projection", generator=g, progress=False
    )
    print(f"at initialisation, GC at the embeddings: exact {exact}; one probe {probe}")

    results: dict[float, tuple[float, float]] = {}
    # once each: --strength 0 is the unpenalised run alone, not it twice
    for strength in dict.fromkeys((0.0, args.strength)):
        torch.manual_seed(0)
        model = TinyTransformer()
        history = fit(
            model,
            train,
            test,
            optimizer="adam",
            lr=3e-3,
            batch_size=64,
            epochs=args.epochs,
            regularizer=GeometricComplexity(strength, wrt="embed"),
            track_gc_every=args.epochs,
            gc_wrt="embed",
            seed=0,
            device="cpu",
            progress=False,
        )
        final = history.final
        results[strength] = (final["gc_train"], final["test_acc"])
        print(
            f"GC penalty {strength:g}: GC at the embeddings {final['gc_train']:.4g}, "
            f"test accuracy {final['test_acc']:.3f}"
        )
    return results


if __name__ == "__main__":
    main()
