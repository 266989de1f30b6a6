"""The VAE's generative uses measured on MTD test normals: denoising and inpainting.

    python pipelines/generative/run.py [--checkpoint runs/mtd/pixel.pt]
                                       [--data ../shared/datasets/mtd/split.json]
    python pipelines/generative/run.py --smoke   # a tiny synthetic model, a few images (CI)

The checkpoint must hold a pixel model (the generative uses need pixels); the default,
runs/mtd/pixel.pt, is trained first when missing (`anomalyvae train MTD --model pixel`).

Denoising: Gaussian noise (sigma 0.05, 0.1, 0.2) and salt-and-pepper (5 %), PSNR and SSIM
against the clean image for: the noisy input, VAE reconstruction (posterior mean and an
8-sample Monte-Carlo average), a 3x3 median filter, a Gaussian filter (sigma 1), and
scikit-image non-local means when installed. Inpainting: random rectangles and irregular
(blob) masks covering 5-40 % of the image; PSNR inside the mask for VAE inpainting
("optimize" and "clamp"), mean fill, and scikit-image biharmonic inpainting when
installed. Also a sample grid and an interpolation strip. Writes reports/generative/.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "pipelines"))

import torch  # noqa: E402
from common import (  # noqa: E402
    PIXEL_CHECKPOINT,
    machine,
    markdown_table,
    pixel_checkpoint,
    shown,
    smoke_model,
)
from PIL import Image  # noqa: E402

from anomalyvae.data import discover  # noqa: E402
from anomalyvae.detector import VAEAnomalyDetector  # noqa: E402
from anomalyvae.generative import grid  # noqa: E402
from anomalyvae.imaging.batch import read_images  # noqa: E402
from anomalyvae.models.generate import denoise, inpaint, interpolate, sample  # noqa: E402
from anomalyvae.models.maps import ssim_map  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "datasets" / "mtd" / "split.json"


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    error = (a - b) ** 2
    mse = error[where].mean() if where is not None else error.mean()
    return float(10 * np.log10(1.0 / max(mse, 1e-12)))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    return float(ssim_map(torch.from_numpy(a), torch.from_numpy(b)).mean())


def masks_for(rng: np.random.Generator, n: int, h: int, w: int, kind: str) -> np.ndarray:
    out = np.zeros((n, h, w), bool)
    for i in range(n):
        target = rng.uniform(0.05, 0.40)
        if kind == "rectangle":
            rh = int(np.clip(np.sqrt(target) * h * rng.uniform(0.7, 1.3), 2, h - 2))
            rw = int(np.clip(target * h * w / rh, 2, w - 2))
            y, x = rng.integers(0, h - rh), rng.integers(0, w - rw)
            out[i, y : y + rh, x : x + rw] = True
        else:  # irregular: thresholded smooth noise at the target coverage
            field = ndimage.gaussian_filter(rng.normal(size=(h, w)), sigma=h / 12)
            out[i] = field > np.quantile(field, 1 - target)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=PIXEL_CHECKPOINT,
        help="a pixel-model checkpoint; the default is trained on MTD when missing",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "generative")
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic model, few images")
    args = parser.parse_args()
    if args.smoke:  # everything on a tiny synthetic set, written to a temp folder
        import tempfile

        tmp = Path(tempfile.mkdtemp(prefix="anomalyvae-generative-smoke-"))
        args.data, args.checkpoint = smoke_model(tmp)
        args.out, args.n_images = tmp / "report", 4
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    detector = VAEAnomalyDetector.load(pixel_checkpoint(args.checkpoint, args.data), progress=False)
    model = detector.model_
    normals = [s.path for s in discover(args.data, "test") if s.label == 0]
    chosen = sorted(rng.permutation(len(normals))[: args.n_images])
    clean, _, _ = read_images([normals[i] for i in chosen], detector.preprocessing_)

    try:
        from skimage.restoration import denoise_nl_means, inpaint_biharmonic
    except ImportError:
        denoise_nl_means = inpaint_biharmonic = None

    denoising = []
    noises = [
        ("gaussian 0.05", 0.05),
        ("gaussian 0.1", 0.1),
        ("gaussian 0.2", 0.2),
        ("salt-and-pepper 5%", None),
    ]
    for name, sigma in noises:
        if sigma is not None:
            noisy = np.clip(clean + rng.normal(0, sigma, clean.shape), 0, 1).astype(np.float32)
        else:
            noisy = clean.copy()
            flips = rng.random(clean.shape) < 0.05
            noisy[flips] = rng.integers(0, 2, flips.sum()).astype(np.float32)
        methods = {
            "noisy input": noisy,
            "VAE (posterior mean)": denoise(model, noisy),
            "VAE (8-sample MC mean)": denoise(model, noisy, n_samples=8),
            "median 3x3": ndimage.median_filter(noisy, size=(1, 1, 3, 3)),
            "Gaussian sigma 1": ndimage.gaussian_filter(noisy, sigma=(0, 0, 1, 1)),
        }
        if denoise_nl_means is not None:
            methods["non-local means (skimage)"] = np.stack(
                [
                    denoise_nl_means(
                        x[0], h=0.8 * (sigma or 0.1), sigma=sigma or 0.1, fast_mode=True
                    )[None]
                    for x in noisy
                ]
            ).astype(np.float32)
        for method, result in methods.items():
            denoising.append(
                {
                    "noise": name,
                    "method": method,
                    "psnr": psnr(result, clean),
                    "ssim": ssim(result.astype(np.float32), clean),
                }
            )

    inpainting = []
    for kind in ("rectangle", "irregular"):
        missing = masks_for(rng, len(clean), clean.shape[2], clean.shape[3], kind)
        hole = missing[:, None]
        mean_fill = clean.copy()
        for i in range(len(clean)):
            mean_fill[i, 0][missing[i]] = clean[i, 0][~missing[i]].mean()
        methods = {
            "mean fill": mean_fill,
            "VAE optimize": inpaint(model, clean, missing, "optimize", iterations=100),
            "VAE clamp": inpaint(model, clean, missing, "clamp", iterations=50),
        }
        if inpaint_biharmonic is not None:
            methods["biharmonic (skimage)"] = np.stack(
                [inpaint_biharmonic(x[0], m)[None] for x, m in zip(clean, missing, strict=True)]
            ).astype(np.float32)
        for method, result in methods.items():
            inpainting.append(
                {
                    "mask": kind,
                    "coverage_mean": float(missing.mean()),
                    "method": method,
                    "psnr_in_mask": psnr(result, clean, hole),
                }
            )

    samples = sample(model, 32, temperature=0.8, seed=0)
    Image.fromarray((grid(samples)[0] * 255).astype(np.uint8)).save(args.out / "samples.png")
    strip = interpolate(model, clean[0], clean[1], steps=8)
    Image.fromarray((grid(strip, columns=8)[0] * 255).astype(np.uint8)).save(
        args.out / "interpolation.png"
    )

    results = {
        "machine": machine(),
        "checkpoint": shown(args.checkpoint),
        "n_images": len(clean),
        "denoising": denoising,
        "inpainting": inpainting,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2))

    import pandas as pd

    den = pd.DataFrame(denoising).pivot(index="method", columns="noise", values="psnr")
    den_ssim = pd.DataFrame(denoising).pivot(index="method", columns="noise", values="ssim")
    inp = pd.DataFrame(inpainting).pivot(index="method", columns="mask", values="psnr_in_mask")
    lines = [
        "# Generative uses: denoising and inpainting on MTD test normals"
        + (" (smoke run: meaningless numbers)" if args.smoke else ""),
        "",
        "Produced by `python pipelines/generative/run.py`; every number comes from that run.",
        f"Machine: {machine()}. Model: {shown(args.checkpoint)} "
        f"({detector.preprocessing_.height}x{detector.preprocessing_.width}), "
        f"{len(clean)} test normals (seeded choice).",
        "",
        "## Denoising: PSNR (dB) against the clean image",
        "",
        markdown_table(den, ".2f"),
        "",
        "## Denoising: SSIM",
        "",
        markdown_table(den_ssim, ".3f"),
        "",
        "## Inpainting: PSNR (dB) inside the mask (masks cover 5-40 %)",
        "",
        markdown_table(inp, ".2f"),
        "",
        "## Samples (temperature 0.8) and a latent interpolation between two test normals",
        "",
        "![samples](samples.png)",
        "",
        "![interpolation](interpolation.png)",
        "",
    ]
    (args.out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
