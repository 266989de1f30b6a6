"""The memory bank: normal feature vectors and each location's distance to the nearest.

A greedy k-center coreset of the training locations (:func:`coreset_indices`, as
PatchCore's bank; Roth et al. 2022) and an exportable nearest-neighbour search
(:func:`nearest_distance`), reduced to an image's ``knn`` view by :func:`knn_view`.
:class:`~anomalyvae.models.feature_vae.FeatureVAE` holds the bank as a buffer.
"""

from __future__ import annotations

import math
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from anomalyvae.errors import InvalidValueError

T = TypeVar("T", Tensor, np.ndarray)

#: Distances one image's ``knn`` block holds at once (location chunk x bank chunk): 1 M
#: floats, 4 MB, so a batch of 32 needs about 128 MB whatever the input size; a block
#: that stays in the cache while its minimum is taken.
KNN_BLOCK = 1 << 20
#: Bank rows per block (the rest of the block is locations). Blocking both ways, not the
#: bank alone over every location, searches the 7616 locations of a 448 x 1088 input about
#: 1.7x as fast in torch and 1.2x in ONNX Runtime (reports/scoring).
KNN_BANK_CHUNK = 1024
#: Share of an image's locations whose nearest-neighbour distances make its ``knn`` view.
KNN_TOP_FRACTION = 0.01
#: Feature locations along each edge of the map that the ``knn`` view leaves out. The
#: outermost locations' receptive fields reach past the image into the backbone's padding
#: (zeros; padding every convolution by reflection instead barely lowered the edge in a
#: trial on MTD), so the outermost locations of every normal image sit farther from the
#: bank than its interior: on the suite's sets the largest distances of most held-out
#: normals were on the edge, where they drowned real defects. One location (8 px) is
#: enough; a defect on the edge still reaches the next location through the 3 x 3
#: feature neighbourhood. Chosen leave-one-set-out over 0, 1 and 2 locations
#: (pipelines/suite/reductions.py, "knn border"); models saved before it leave out none.
KNN_BORDER = 1
#: Rings of feature locations along the map's edge that get their own constants in the
#: anomaly map (:func:`edge_rings`; ``FeatureVAEConfig.map_border``): the same padding
#: lifts the ELBO and the bank distance near the edge, so with one set of constants the
#: map of most normal images peaks on its outermost ring (bright borders on good parts).
#: Three rings (24 px), chosen leave-one-set-out over 0-3 on the suite's sets with pixel
#: masks (pipelines/suite/edges.py: 2 of 3 folds); models saved before it use one set of
#: constants.
MAP_BORDER = 3

#: Rows of the bank of a model whose input has at most :data:`BANK_FULL_PIXELS` pixels.
BANK_SIZE = 8192
#: Above this many model-input pixels the bank shrinks in proportion to the input
#: (:func:`auto_bank_size`): the search costs locations x rows, and the locations grow
#: with the input, so an image's search never costs more than it does at 512 x 512.
BANK_FULL_PIXELS = 512 * 512
#: A shrunk bank's rows are a multiple of this, and at least :data:`BANK_MIN_ROWS`.
BANK_ROW_STEP = 512
BANK_MIN_ROWS = 1024


def auto_bank_size(height: int, width: int) -> int:
    """Rows of the memory bank for a model input of ``height`` x ``width`` ("auto").

    :data:`BANK_SIZE` up to :data:`BANK_FULL_PIXELS` pixels; above, the rows that keep
    the search's locations x rows at its 512 x 512 cost (rounded down to a multiple of
    :data:`BANK_ROW_STEP`, at least :data:`BANK_MIN_ROWS`): 4096 rows at 448 x 1088,
    3584 at 1216 x 480. On the commutators (1216 x 480) a bank cut to a half, a quarter
    or an eighth of its 3584 rows ranked images and pixels within 0.005 of it
    (reports/suite/bank.md; with Lite0, 4096 and 2048 rows were within 0.004 of 8192).
    """
    pixels = height * width
    if pixels <= BANK_FULL_PIXELS:
        return BANK_SIZE
    rows = int(BANK_SIZE * BANK_FULL_PIXELS / pixels) // BANK_ROW_STEP * BANK_ROW_STEP
    return max(BANK_MIN_ROWS, rows)


#: Principal directions of the bank that the search takes its dot products in, above
#: :data:`BANK_FULL_PIXELS` model-input pixels (:func:`auto_bank_dim`; the norms stay
#: exact, :meth:`~anomalyvae.models.feature_vae.FeatureVAE.project_bank`). Up to
#: 512 x 512 the bank keeps every feature channel. On the commutators (1216 x 480, the
#: suite's only set above 512 x 512) every projection reports/suite/bank.md measured
#: ranked images and pixels as well as all 168 of Lite2's channels: 64 directions 0.803 /
#: 0.927 / 0.817 image / pixel AUROC / AUPRO against 0.801 / 0.925 / 0.811 (96: 0.801 /
#: 0.926 / 0.814). 64 is where the search's matrix products get cheap on a CPU (a 65-wide
#: inner dimension, the norms' column included, runs in about half the time of 97 in
#: one run, 128 no slower than 97), so an image of 448 x 1088 scores in about 0.9 of the
#: time of 96 directions. At 256 x 256 and 8192 rows 96 directions already cost the
#: screws 0.007 image AUROC and 64 cost them 0.021, which is why smaller inputs keep
#: every channel.
BANK_LARGE_DIM = 64


def auto_bank_dim(height: int, width: int, channels: int) -> int:
    """Directions the bank is searched in for a model input of ``height`` x ``width``.

    0 (every one of the backbone's ``channels``) up to :data:`BANK_FULL_PIXELS` pixels,
    :data:`BANK_LARGE_DIM` above (0 again where the backbone has no more channels than
    that); reports/budget times evaluate of 400 images of 1130 x 460 against its 3
    minutes.
    """
    if height * width <= BANK_FULL_PIXELS or channels <= BANK_LARGE_DIM:
        return 0
    return BANK_LARGE_DIM


def _auto_or_at_least(value: object, minimum: int, message: str) -> int | str:
    """``value`` if it is "auto" or an int (not a bool) >= ``minimum``; else the error."""
    if value == "auto":
        return "auto"
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidValueError(f"{message}, got {value!r}")
    return value


def check_bank_dim(bank_dim: object) -> int | str:
    """``bank_dim`` if it is "auto" or a whole number of directions >= 0 (0: every channel)."""
    return _auto_or_at_least(
        bank_dim,
        0,
        "bank_dim must be 'auto', 0 (every feature channel) or a number of principal directions",
    )


def resolve_bank_dim(bank_dim: int | str, height: int, width: int, channels: int) -> int:
    """The directions ``bank_dim`` stands for; a request at or above ``channels`` is 0."""
    dim = auto_bank_dim(height, width, channels) if bank_dim == "auto" else int(bank_dim)
    return 0 if dim >= channels else dim


#: The fewest bank rows a model may be asked for.
BANK_MIN_REQUEST = 16


def check_bank_size(bank_size: object) -> int | str:
    """``bank_size`` if it is "auto" or an int of at least :data:`BANK_MIN_REQUEST` rows."""
    return _auto_or_at_least(
        bank_size, BANK_MIN_REQUEST, f"bank_size must be 'auto' or at least {BANK_MIN_REQUEST} rows"
    )


def resolve_bank_size(bank_size: int | str, height: int, width: int) -> int:
    """The rows ``bank_size`` stands for at a model input of ``height`` x ``width``."""
    return auto_bank_size(height, width) if bank_size == "auto" else int(bank_size)


def interior(distances: T, border: int) -> T:
    """Location values (n, h, w) without ``border`` locations along each edge.

    Unchanged where the map is too small to keep any. Tensor or array alike (the suite's
    pipelines re-reduce stored distances with it).
    """
    height, width = int(distances.shape[-2]), int(distances.shape[-1])  # fixed per model
    if border > 0 and min(height, width) > 2 * border:
        return distances[:, border : height - border, border : width - border]
    return distances


def edge_rings(height: int, width: int, border: int) -> Tensor:
    """Each location's edge ring of a ``height`` x ``width`` map, (h, w) int64.

    A location's distance in locations from the nearest edge, capped at ``border``: 0 is
    the outermost ring, ``border`` the interior. Constants when traced (the map's size is
    fixed per model).
    """
    rows, cols = torch.arange(height), torch.arange(width)
    rows = torch.minimum(rows, height - 1 - rows)
    cols = torch.minimum(cols, width - 1 - cols)
    return torch.minimum(rows[:, None], cols[None, :]).clamp(max=max(border, 0))


def knn_view(distances: Tensor, border: int = 0) -> Tensor:
    """The ``knn`` view (n,) of location distances (n, h, w).

    The mean of each image's largest ``KNN_TOP_FRACTION`` (at least one), ``border``
    locations along each edge left out (:func:`interior`).
    """
    flat = interior(distances, border).flatten(1)
    k = max(1, int(KNN_TOP_FRACTION * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


def greedy_coreset(
    vectors: Tensor, size: int, seed: int = 0, pool: int = 80000, dim: int = 32
) -> Tensor:
    """``size`` rows of ``vectors`` (n, c) that cover them (:func:`coreset_indices`)."""
    return vectors[coreset_indices(vectors, size, seed, pool, dim)].clone()


def coreset_indices(
    vectors: Tensor, size: int, seed: int = 0, pool: int = 80000, dim: int = 32
) -> Tensor:
    """Rows of ``vectors`` (n, c) that cover them: greedy k-center selection.

    Each step adds the vector farthest from those chosen so far (Sener & Savarese 2018;
    PatchCore's memory bank), so rare normal patterns are kept, where a random sample
    would keep mostly the common ones. For speed the distances are measured after a
    seeded Gaussian random projection to ``dim`` dimensions (Johnson-Lindenstrauss) and
    among a random ``pool`` of the vectors. Deterministic for a seed; the first ``k``
    rows of the result are the coreset of size ``k``.
    """
    generator = torch.Generator().manual_seed(seed)
    candidates = torch.arange(len(vectors))
    if len(vectors) > pool:
        candidates = torch.randperm(len(vectors), generator=generator)[:pool]
    if size >= len(candidates):
        return candidates
    projection = torch.randn(vectors.shape[1], dim, generator=generator) / math.sqrt(dim)
    z = vectors[candidates] @ projection
    chosen = [0]
    nearest = ((z - z[0]) ** 2).sum(1)
    for _ in range(size - 1):
        index = int(nearest.argmax())
        chosen.append(index)
        nearest = torch.minimum(nearest, ((z - z[index]) ** 2).sum(1))
    return candidates[torch.tensor(chosen)]


def nearest_distance(
    features: Tensor,
    bank: Tensor,
    projection: tuple[Tensor, Tensor, Tensor] | None = None,
    block: int | None = None,
    bank_chunk: int | None = None,
) -> Tensor:
    """Each location's Euclidean distance to its nearest bank row.

    ``features`` (n, c, h, w), ``bank`` (b, c); (n, h, w) out. ``|q - b|^2 = |q|^2 +
    (|b|^2 - 2 q.b)``, minimized block by block: ``bank_chunk`` rows of the bank
    (``KNN_BANK_CHUNK``) against as many locations as keep one image's block near
    ``block`` distances (``KNN_BLOCK``), whatever the input size (static slices: exports
    as is). ``projection`` (mean (c,), basis (c, d), ``|b - mean|^2`` (b,)) says that
    ``bank`` holds its rows' coordinates (b, d) in that basis
    (:meth:`FeatureVAE.project_bank`): the norms are then the full, centred ones and only
    ``q.b`` is taken in the basis.
    """
    height, width = int(features.shape[-2]), int(features.shape[-1])  # fixed per model
    queries = features.flatten(2).transpose(1, 2)  # (n, hw, c)
    if projection is not None:
        mean, basis, bank_sq = projection
        queries = queries - mean
        query_sq = (queries**2).sum(-1)
        queries = torch.matmul(queries, basis)
    else:
        query_sq, bank_sq = (queries**2).sum(-1), (bank**2).sum(-1)
    # a column of ones on the queries carries |b|^2 through the product: one MatMul per
    # chunk instead of MatMul + Add over the whole distance block (-22 % of the search's
    # time in ONNX Runtime at 1216 x 480)
    queries = torch.cat([queries, torch.ones_like(query_sq).unsqueeze(-1)], dim=-1)
    size, locations = len(bank), int(queries.shape[1])
    chunk = max(1, min(size, bank_chunk or KNN_BANK_CHUNK))
    span = max(1, min(locations, (block or KNN_BLOCK) // chunk))
    weights = [
        torch.cat([bank[start : start + chunk] * -2.0, bank_sq[start : start + chunk, None]], 1).T
        for start in range(0, size, chunk)
    ]
    parts = []
    for first in range(0, locations, span):
        part, nearest = queries[:, first : first + span], None
        for chunk_weights in weights:
            # amin, not min(dim): the values alone, no argmin beside them (1.4x the
            # search's speed on a 2-core CPU, the same values)
            best = torch.matmul(part, chunk_weights).amin(dim=-1)
            nearest = best if nearest is None else torch.minimum(nearest, best)
        parts.append(nearest)
    nearest = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    distance = (nearest + query_sq).clamp(min=0.0).sqrt()
    return distance.unflatten(1, (height, width))  # the batch stays dynamic
