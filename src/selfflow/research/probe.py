"""The representation probe: how linearly readable a block's features are, per (layer, τ).

Self-Flow's claim is that self-distillation makes the network's internal features better. The
probe measures that directly: each held-out image is noised to a fixed level τ with noise of
its own, passed through the network up to block ``L`` with the **null label** (so the class
cannot reach the features through the conditioning), its block output is averaged over the
tokens, and a multinomial logistic regression fitted on one part of the images names the
classes of the other part. The accuracy on that other part is the probe's number.

Everything random is keyed by the dataset row (:func:`selfflow.base.seeds.keyed_rng`): the row's
posterior draw, its noise (one ε per row, shared by every τ so that levels are compared on the
same draw) and the split into probe-train and probe-test rows (one permutation keyed by the
seed). A row's features do not depend on which batch it was computed in, beyond float rounding.
Several processes split the work by whole batches (:func:`feature_pieces`), the batches one
process would make, so the gathered features, and every figure, are one process's bit for bit.

The classifier is written here in torch (no scikit-learn in the package): full-batch L-BFGS
on standardised features in float64, with the loss summed over chunks of rows so that
ImageNet's 1.28 M rows × 1000 classes fit on one GPU. Its objective is scikit-learn's
``LogisticRegression(C=c)`` (multinomial, L2 on the weights, not the bias), scaled by 1/n:
the tests compare the two.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from selfflow.base import distributed
from selfflow.base.errors import ConfigurationError
from selfflow.base.seeds import keyed_rng, normals
from selfflow.data import LatentDataset
from selfflow.model.latents import LatentConvention
from selfflow.model.network import SelfFlowDiT

SPLIT_PURPOSE = "probe-split"
POSTERIOR_PURPOSE = "probe-posterior"
NOISE_PURPOSE = "probe-noise"
DEFAULT_TEST_FRACTION = 0.2
DEFAULT_C = 1.0
DEFAULT_MAX_ITER = 300
DEFAULT_TOLERANCE = 1e-7  # on the largest gradient entry of the mean loss
CHUNK_ROWS = 65536  # rows per chunk of the classifier's loss (ImageNet: 20 chunks)


# ----------------------------------------------------------------------------------------------
# Which rows: a seeded split


def split_rows(num_rows: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_rows, test_rows)``, each sorted: a permutation keyed by ``seed`` alone, whose
    first ``round(num_rows · test_fraction)`` rows are the test rows."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigurationError(f"the test fraction must lie in (0, 1); got {test_fraction}")
    num_test = int(round(num_rows * test_fraction))
    if num_test < 1 or num_test > num_rows - 2:
        raise ConfigurationError(
            f"a test fraction of {test_fraction} of {num_rows} images leaves {num_test} test and "
            f"{num_rows - num_test} training images; the probe needs at least 1 and 2"
        )
    order = keyed_rng(seed, 0, SPLIT_PURPOSE).permutation(num_rows)
    return np.sort(order[num_test:]), np.sort(order[:num_test])


# ----------------------------------------------------------------------------------------------
# Features


def model_convention(
    model: SelfFlowDiT, dataset: LatentDataset, what: str = "the data"
) -> LatentConvention:
    """The latent convention that brings ``dataset``'s latents to ``model``'s numbers: the one
    its card says it was trained on (with that training data's per-channel statistics, as
    validation uses them), refused when the dataset holds another VAE's latents, naming both.
    A model without a recorded convention (the released checkpoint, cards of earlier versions,
    a network built in memory) takes the dataset's own."""
    card = getattr(getattr(model, "checkpoint_info", None), "card", None)
    trained = getattr(card, "latent", None)
    if trained is None:
        return dataset.latent
    if not trained.same_vae_space(dataset.latent):
        raise ConfigurationError(
            f"{what} {dataset.root} holds latents of {dataset.latent.describe()}, but the model "
            f"was trained on {trained.describe()}: probe it on data prepared with its VAE"
        )
    recorded, found = card.vae_identity, dataset.manifest.get("vae_identity")
    if recorded is not None and found is not None and recorded != found:
        from selfflow.model.card import short

        raise ConfigurationError(
            f"{what} {dataset.root} holds latents of the encoder {short(found)}, but the model "
            f"was trained on latents of the encoder {short(recorded)}: its features would "
            f"describe another latent space; probe it on data prepared with its VAE"
        )
    return trained


def clean_latents(
    dataset: LatentDataset, rows: np.ndarray, seed: int, latent: LatentConvention | None = None
) -> tuple[Tensor, Tensor]:
    """``(x0, labels)`` of ``rows``: ``z = mean + std · n`` with ``n`` drawn from the row's own
    stream (without stds, ``z = mean``), brought to the model's numbers by ``latent`` (default:
    the dataset's own convention), as the trainer does (``(z − shift) · scale``, then any
    per-channel statistics)."""
    means, stds, labels = dataset.get_batch(rows)
    if stds is not None:
        draws = [normals(keyed_rng(seed, int(r), POSTERIOR_PURPOSE), means.shape[1:]) for r in rows]
        means = means + stds * torch.stack(draws)
    return (latent or dataset.latent).normalise(means), labels


def row_noise(rows: np.ndarray, shape: Sequence[int], seed: int) -> Tensor:
    """The standard-normal ε of each row, ``(len(rows), *shape)``: one per row, every τ."""
    return torch.stack([normals(keyed_rng(seed, int(r), NOISE_PURPOSE), shape) for r in rows])


@torch.no_grad()
def block_features(
    model: SelfFlowDiT, x: Tensor, tau: float, layers: Sequence[int]
) -> dict[int, Tensor]:
    """The token-mean output of each block in ``layers`` (1-based) for inputs ``x`` noised to
    ``tau``, under the null label: ``{layer: (B, hidden)}`` in float32.

    One forward pass up to the deepest layer (``hidden_layer=``, which skips the later blocks
    and the final layer); the shallower blocks' outputs are caught by forward hooks.
    """
    caught: dict[int, Tensor] = {}
    hooks = [
        model.blocks[layer - 1].register_forward_hook(
            lambda _module, _inputs, output, layer=layer: caught.__setitem__(
                layer, output.float().mean(dim=1)
            )
        )
        for layer in sorted(set(layers))
    ]
    try:
        b = x.shape[0]
        null = torch.full((b,), model.config.null_class, dtype=torch.int64, device=x.device)
        taus = torch.full((b,), float(tau), dtype=x.dtype, device=x.device)
        model(x, taus, null, hidden_layer=max(layers))
    finally:
        for hook in hooks:
            hook.remove()
    return {layer: caught[layer] for layer in layers}


FeatureKey = tuple[int, float]  # (layer, tau)
# (batch number, {(layer, tau): (rows, hidden)}, labels): one batch of rows' features
Piece = tuple[int, dict[FeatureKey, Tensor], Tensor]


def feature_pieces(
    model: SelfFlowDiT,
    dataset: LatentDataset,
    rows: np.ndarray,
    layers: Sequence[int],
    taus: Sequence[float],
    *,
    seed: int,
    batch_size: int = 256,
    rank: int = 0,
    world_size: int = 1,
    advance: Callable[[int], object] | None = None,
    latent: LatentConvention | None = None,
) -> list[Piece]:
    """The features of this process's batches: batch ``j`` is ``rows[j·B : (j+1)·B]`` and goes
    to rank ``j mod world_size``.

    The batches are the same on any process count (only their owner changes), so each is
    computed exactly as one process would compute it: :func:`join_pieces` of every rank's
    pieces is the one-process result bit for bit, not only up to the rounding of other
    batch shapes. ``advance(k)`` is called after each batch of k rows (a progress bar).
    ``latent``: the model's latent convention (:func:`model_convention`; default: the
    dataset's).
    """
    param = next(model.parameters())
    shape = dataset.latent_shape
    starts = range(0, len(rows), batch_size)
    pieces: list[Piece] = []
    for start in distributed.assign(list(starts), rank, world_size):
        chunk = np.asarray(rows[start : start + batch_size])
        x0, y = clean_latents(dataset, chunk, seed, latent)
        noise = row_noise(chunk, shape, seed)
        found: dict[FeatureKey, Tensor] = {}
        for tau in taus:
            x = ((1.0 - tau) * x0 + tau * noise).to(param.device, param.dtype)
            for layer, value in block_features(model, x, tau, layers).items():
                found[(layer, tau)] = value.cpu()
        pieces.append((start // batch_size, found, y))
        if advance is not None:
            advance(len(chunk))
    return pieces


def join_pieces(pieces: Sequence[Piece]) -> tuple[dict[FeatureKey, Tensor], Tensor]:
    """Every batch's pieces (from any ranks, in any order) as ``(features, labels)`` in row
    order; a missing or repeated batch is an error, not a silently shorter table."""
    ordered = sorted(pieces, key=lambda piece: piece[0])
    numbers = [number for number, _, _ in ordered]
    if not ordered or numbers != list(range(len(ordered))):
        raise ConfigurationError(
            f"the probe's feature batches must be 0..n-1, each once; found {numbers[:8]}"
        )
    keys = list(ordered[0][1])
    features = {key: torch.cat([found[key] for _, found, _ in ordered]) for key in keys}
    return features, torch.cat([labels for _, _, labels in ordered])


def probe_features(
    model: SelfFlowDiT,
    dataset: LatentDataset,
    rows: np.ndarray,
    layers: Sequence[int],
    taus: Sequence[float],
    *,
    seed: int,
    batch_size: int = 256,
    advance: Callable[[int], object] | None = None,
) -> tuple[dict[FeatureKey, Tensor], Tensor]:
    """``({(layer, tau): (n, hidden) float32 CPU}, labels (n,))`` for ``rows`` in their order.

    ``x_τ = (1 − τ) · x0 + τ · ε`` (the paper's path, τ = 1 noise) with the row's own x0 and ε.
    ``advance(k)`` is called after each batch of k rows (a progress bar). The latents are
    brought to the model's numbers by :func:`model_convention`.
    """
    latent = model_convention(model, dataset)
    common = dict(seed=seed, batch_size=batch_size, advance=advance, latent=latent)
    return join_pieces(feature_pieces(model, dataset, rows, layers, taus, **common))


# ----------------------------------------------------------------------------------------------
# The classifier


@dataclass(frozen=True)
class LinearClassifier:
    """``argmax(((f − mean) / scale) · weight + bias)``: a multinomial logistic regression on
    standardised features (the standardisation is part of it, fitted on its training rows)."""

    weight: Tensor  # (hidden, classes)
    bias: Tensor  # (classes,)
    mean: Tensor  # (hidden,)
    scale: Tensor  # (hidden,)
    loss: float  # the objective at the fitted point
    iterations: int

    def logits(self, features: Tensor, chunk: int = CHUNK_ROWS) -> Tensor:
        parts = [
            _standardised(features[i : i + chunk], self.mean, self.scale) @ self.weight + self.bias
            for i in range(0, len(features), chunk)
        ]
        return torch.cat(parts) if parts else features.new_zeros((0, len(self.bias)))

    def predict(self, features: Tensor) -> Tensor:
        return self.logits(features).argmax(dim=1)

    def accuracy(self, features: Tensor, labels: Tensor) -> float:
        predicted = self.predict(features).cpu()
        return float((predicted == labels.cpu()).double().mean())


def _standardised(features: Tensor, mean: Tensor, scale: Tensor) -> Tensor:
    return (features.to(device=mean.device, dtype=mean.dtype) - mean) / scale


def _objective(
    features: Tensor,
    labels: Tensor,
    weight: Tensor,
    bias: Tensor,
    standardisation: tuple[Tensor, Tensor],
    c: float,
    chunk: int,
    backward: bool = False,
) -> Tensor:
    """``mean_i CE + |W|² / (2·c·n)``, summed chunk by chunk; with ``backward``, each chunk's
    gradient is accumulated as it goes, so only one chunk's graph exists at a time."""
    n = len(features)
    total = torch.zeros((), dtype=weight.dtype, device=weight.device)
    for i in range(0, n, chunk):
        x = _standardised(features[i : i + chunk], *standardisation)
        part = F.cross_entropy(x @ weight + bias, labels[i : i + chunk], reduction="sum") / n
        if backward:
            part.backward()
        total += part.detach()
    penalty = weight.square().sum() / (2.0 * c * n)
    if backward:
        penalty.backward()
    return total + penalty.detach()


def fit_logistic(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    *,
    c: float = DEFAULT_C,
    max_iter: int = DEFAULT_MAX_ITER,
    dtype: torch.dtype = torch.float64,
    chunk: int = CHUNK_ROWS,
    standardize: bool = True,
    tolerance: float = DEFAULT_TOLERANCE,
) -> LinearClassifier:
    """Minimise ``mean_i CE(W·f̂_i + b, y_i) + |W|² / (2·c·n)`` by full-batch L-BFGS from zero.

    ``f̂`` is ``f`` standardised with the training rows' mean and standard deviation (a column
    that does not vary keeps scale 1). The objective is scikit-learn's ``C · Σ CE + |W|² / 2``
    divided by ``C · n``: the same minimiser. It is strictly convex, so the result does not
    depend on the path, and the fit is deterministic: fixed start, fixed chunk order. The work
    runs on ``features``' device; the loss is summed chunk by chunk with one backward each, so
    the logits of at most ``chunk`` rows exist at once.
    """
    n, width = features.shape
    if n == 0 or labels.shape != (n,):
        raise ConfigurationError(f"the classifier needs rows and one label each; got {n} rows")
    device = features.device
    f64 = features.to(dtype)
    mean = f64.mean(dim=0) if standardize else torch.zeros(width, dtype=dtype, device=device)
    scale = f64.std(dim=0, unbiased=False) if standardize else torch.ones_like(mean)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    del f64
    y = labels.to(device=device, dtype=torch.int64)
    weight = torch.zeros(width, num_classes, dtype=dtype, device=device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=dtype, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        max_eval=max_iter * 2,
        tolerance_grad=tolerance,
        tolerance_change=tolerance * 1e-3,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def objective() -> Tensor:
        optimizer.zero_grad()
        return _objective(features, y, weight, bias, (mean, scale), c, chunk, backward=True)

    with torch.enable_grad():  # a caller's no_grad (feature extraction) must not reach here
        optimizer.step(objective)
    state = optimizer.state[optimizer._params[0]]
    with torch.no_grad():
        final = float(_objective(features, y, weight, bias, (mean, scale), c, chunk))
    return LinearClassifier(
        weight=weight.detach(),
        bias=bias.detach(),
        mean=mean,
        scale=scale,
        loss=final,
        iterations=int(state.get("n_iter", 0)),
    )


# ----------------------------------------------------------------------------------------------
# The probe


@dataclass(frozen=True)
class ProbeResult:
    """One (layer, τ) cell of the probe."""

    layer: int
    tau: float
    accuracy: float  # on the probe-test rows
    train_accuracy: float
    loss: float  # the classifier's objective on its training rows
    iterations: int

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "tau": self.tau,
            "accuracy": self.accuracy,
            "train_accuracy": self.train_accuracy,
            "classifier_loss": self.loss,
            "classifier_iterations": self.iterations,
        }


def fit_and_score(
    train: tuple[dict[tuple[int, float], Tensor], Tensor],
    test: tuple[dict[tuple[int, float], Tensor], Tensor],
    num_classes: int,
    *,
    c: float = DEFAULT_C,
    max_iter: int = DEFAULT_MAX_ITER,
    device: torch.device | str = "cpu",
) -> list[ProbeResult]:
    """One classifier per (layer, τ), fitted on ``train``'s features and scored on ``test``'s."""
    (train_features, train_labels), (test_features, test_labels) = train, test
    results = []
    for (layer, tau), features in train_features.items():
        classifier = fit_logistic(
            features.to(device), train_labels, num_classes, c=c, max_iter=max_iter
        )
        results.append(
            ProbeResult(
                layer=layer,
                tau=tau,
                accuracy=classifier.accuracy(test_features[(layer, tau)], test_labels),
                train_accuracy=classifier.accuracy(features, train_labels),
                loss=classifier.loss,
                iterations=classifier.iterations,
            )
        )
    return results


def check_probe_request(model: SelfFlowDiT, layers: Sequence[int], taus: Sequence[float]) -> None:
    """Layers are 1-based blocks of this model and every τ lies strictly inside (0, 1)."""
    check_cells(model.config.depth, layers, taus)


def check_cells(
    depth: int,
    layers: Sequence[int],
    taus: Sequence[float],
    layer_option: str = "--layer",
    tau_option: str = "--tau",
) -> None:
    """:func:`check_probe_request` for a model of ``depth`` blocks not built yet (the digits
    runs check theirs before training), naming the caller's own options."""
    if not layers or not taus:
        raise ConfigurationError("the probe needs at least one layer and one tau")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= depth:
            raise ConfigurationError(
                f"{layer_option} must be a block number in 1..{depth} (1-based; this model has "
                f"{depth} blocks); got {layer!r}"
            )
    for tau in taus:
        if not 0.0 < float(tau) < 1.0:
            raise ConfigurationError(
                f"{tau_option} must lie strictly between 0 (clean) and 1 (pure noise); got {tau}"
            )


def run_probe(
    model: SelfFlowDiT,
    dataset: LatentDataset,
    layers: Sequence[int],
    taus: Sequence[float],
    *,
    seed: int = 0,
    train_rows: np.ndarray | None = None,
    test_rows: np.ndarray | None = None,
    test_dataset: LatentDataset | None = None,
    batch_size: int = 256,
    c: float = DEFAULT_C,
    max_iter: int = DEFAULT_MAX_ITER,
    advance: Callable[[int], object] | None = None,
    context: distributed.DistributedContext | None = None,
) -> list[ProbeResult] | None:
    """The probe of ``model`` on ``dataset``, one result per (layer, τ) in that order.

    Rows: ``train_rows`` / ``test_rows`` as given, else :func:`split_rows` with
    ``DEFAULT_TEST_FRACTION``; with ``test_dataset``, every row of ``dataset`` trains and every
    row of ``test_dataset`` tests (its rows are keyed as its own, under the same seed).

    With a distributed ``context`` every process calls this: each computes its share of the
    batches (:func:`feature_pieces`), rank 0 gathers them in row order and fits the classifiers
    alone, and returns the results; the other ranks return None. The features, and so every
    figure, are those of one process.
    """
    check_probe_request(model, layers, taus)
    context = context or distributed.DistributedContext()
    layers, taus = list(layers), [float(t) for t in taus]
    if test_dataset is not None:
        train_rows = np.arange(len(dataset)) if train_rows is None else train_rows
        test_rows = np.arange(len(test_dataset)) if test_rows is None else test_rows
    elif train_rows is None or test_rows is None:
        train_rows, test_rows = split_rows(len(dataset), DEFAULT_TEST_FRACTION, seed)
    common = dict(
        seed=seed,
        batch_size=batch_size,
        advance=advance,
        rank=context.rank,
        world_size=context.world_size,
    )
    test_data = test_dataset or dataset
    mine = (
        feature_pieces(
            model, dataset, train_rows, layers, taus, **common,
            latent=model_convention(model, dataset),
        ),
        feature_pieces(
            model, test_data, test_rows, layers, taus, **common,
            latent=model_convention(model, test_data, "the test data"),
        ),
    )  # fmt: skip
    gathered = distributed.gather_objects(context, mine)
    if gathered is None:
        return None  # not rank 0: rank 0 fits and reports
    train = join_pieces([piece for train_part, _ in gathered for piece in train_part])
    test = join_pieces([piece for _, test_part in gathered for piece in test_part])
    device = next(model.parameters()).device
    by_key = {
        (r.layer, r.tau): r
        for r in fit_and_score(
            train, test, dataset.num_classes, c=c, max_iter=max_iter, device=device
        )
    }
    return [by_key[(layer, tau)] for layer in layers for tau in taus]
