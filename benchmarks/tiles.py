"""Tiled dense inference: dask-infer against a plain PyTorch sliding-window loop over the same image.

One large RGB uint8 image in a Zarr store chunked ``--chunk`` pixels a side; both sides cut
it into the same tiles with the same halo, normalise each window, run the same model
(random weights, seeded), keep each tile's centre and write the stitched logits to a new
Zarr store. The plain loop is what a user writes by hand: for each tile, read its window
from Zarr, forward, crop, write. Tiles/s, pixels/s and the halo's overhead (extra pixels
computed) are printed. The stitched maps of both sides must agree: max relative error
``max|got - ref| / max|ref|`` at most 1e-5 and identical masks on at least 99.99% of pixels;
outside that the script exits with status 1 and one ``OUTPUT CHECK FAILED`` line.

    python benchmarks/tiles.py [--model fcn_resnet50] [--size 768] [--tile 256] [--halo 64]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from _common import Tolerance, compare_logits, exit_if_failed, machine_info, machine_line

import dask_infer
from dask_infer.models import build_model
from dask_infer.tiles.grid import dense_grid
from dask_infer.workflows.cores import usable_cores

TOLERANCE = Tolerance(max_rel_err=1e-5, min_agreement=0.9999)


def write_image(url: str, size: int, chunk: int) -> None:
    """One smooth random RGB image (blurred noise, so the model's map has structure)."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, size=(size // 16 + 1, size // 16 + 1, 3)).astype(np.float32)
    image = np.kron(coarse, np.ones((16, 16, 1), dtype=np.float32))[:size, :size]
    image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
    group = zarr.open_group(url, mode="w")
    arr = group.create_array(
        "images",
        shape=(1, size, size, 3),
        chunks=(1, chunk, chunk, 3),
        dtype="uint8",
        dimension_names=("image", "y", "x", "channel"),
    )
    arr[0] = image


def plain_loop(url: str, out_url: str, model_name: str, tile: int, halo: int) -> tuple[float, int]:
    """Hand-written sliding window; seconds after the model is built and warmed up, and tiles run."""
    loaded = build_model(model_name)
    model = loaded.module.eval()
    with torch.inference_mode():  # one blank window first, as each dask-infer worker runs at load
        model(torch.zeros(1, 3, tile + 2 * halo, tile + 2 * halo))
    start = time.perf_counter()
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    src = zarr.open_group(url, mode="r")["images"]
    _, height, width, _ = src.shape
    out = zarr.create_array(
        out_url,
        shape=(1, loaded.num_classes, height, width),
        chunks=(1, loaded.num_classes, tile, tile),
        dtype="float32",
    )
    tiles = 0
    with torch.inference_mode():
        for y in range(0, height, tile):
            for x in range(0, width, tile):
                y0, x0 = max(0, y - halo), max(0, x - halo)
                y1, x1 = min(height, y + tile + halo), min(width, x + tile + halo)
                window = torch.from_numpy(np.asarray(src[0, y0:y1, x0:x1])).permute(2, 0, 1)[None]
                logits = model((window.float().div(255) - mean) / std)[0]
                h, w = min(tile, height - y), min(tile, width - x)
                out[0, :, y : y + h, x : x + w] = logits[:, y - y0 : y - y0 + h, x - x0 : x - x0 + w].numpy()
                tiles += 1
    return time.perf_counter() - start, tiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fcn_resnet50")
    parser.add_argument("--size", type=int, default=768)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--halo", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--stages", type=int, default=1, help="stages dask-infer cuts the model into (tiles run through them)"
    )
    parser.add_argument(
        "--placement", default="auto", help="dask-infer's placement: auto, data, pipeline, hybrid"
    )
    parser.add_argument(
        "--workers", type=int, help="dask-infer's local workers (default: what the run picks)"
    )
    parser.add_argument("--threads", type=int, help="threads per dask-infer worker")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    layout = {"stages": args.stages, "placement": args.placement}
    if args.workers is not None:
        layout["n_workers"] = args.workers
    if args.threads is not None:
        layout["threads_per_worker"] = args.threads

    work = Path(tempfile.mkdtemp(prefix="dask-infer-tiles-"))
    grid = dense_grid(args.size, args.size, args.tile, args.halo)
    try:
        url = str(work / "image.zarr")
        write_image(url, args.size, args.chunk)
        torch.set_num_threads(usable_cores())
        plain, ours, ours_total = [], [], []
        for r in range(args.repeats):
            seconds, tiles = plain_loop(url, str(work / f"plain-{r}.zarr"), args.model, args.tile, args.halo)
            plain.append(seconds)
            t0 = time.perf_counter()
            summary = dask_infer.run(
                url,
                str(work / f"ours-{r}.zarr"),
                model=args.model,
                tile=args.tile,
                halo=args.halo,
                outputs=("logits",),
                progress=False,
                echo=None,
                **layout,
            )
            ours_total.append(time.perf_counter() - t0)
            ours.append(summary.seconds)
        checks = [
            compare_logits(
                f"dask-infer stitched logits, round {r + 1}",
                per_pixel(zarr.open_group(str(work / f"ours-{r}.zarr"), mode="r")["logits"][0]),
                per_pixel(zarr.open_array(str(work / f"plain-{r}.zarr"), mode="r")[0]),
                TOLERANCE,
                reference="plain PyTorch sliding window",
            )
            for r in range(args.repeats)
        ]
        pixels = args.size * args.size
        result = {
            "machine_info": machine_info(),
            "model": args.model,
            "image": f"{args.size}x{args.size}",
            "tile": args.tile,
            "halo": args.halo,
            "storage_chunk": args.chunk,
            "tiles": tiles,
            "halo_overhead": grid.halo_overhead,
            "computed_pixels": grid.computed_pixels,
            "plain_tiles_per_s": tiles / min(plain),
            "plain_pixels_per_s": pixels / min(plain),
            "dask_infer_tiles_per_s": tiles / min(ours),
            "dask_infer_pixels_per_s": pixels / min(ours),
            "dask_infer_with_cluster_start_pixels_per_s": pixels / min(ours_total),
            "ratio": min(plain) / min(ours),
            "ratio_with_cluster_start": min(plain) / min(ours_total),
            "cluster": summary.cluster,
            "placement": summary.placement.get("mode", "data"),
            "stages": args.stages,
            "output_checks": [c.to_dict() for c in checks],
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    print(machine_line(result["machine_info"]))
    for c in checks:
        print(c.line())
    print(
        f"tiles of {args.tile} with halo {args.halo}: {100 * grid.halo_overhead:.0f}% extra pixels computed; "
        f"plain {result['plain_tiles_per_s']:.2f} tiles/s "
        f"({result['plain_pixels_per_s'] / 1e6:.3f} Mpixel/s), "
        f"dask-infer {result['dask_infer_tiles_per_s']:.2f} tiles/s "
        f"({result['dask_infer_pixels_per_s'] / 1e6:.3f} Mpixel/s)"
    )
    print(
        f"dask-infer / plain loop: {result['ratio']:.2f}x ({result['ratio_with_cluster_start']:.2f}x with "
        "cluster start)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    exit_if_failed(checks, "tiles.py")


def per_pixel(logits: np.ndarray) -> np.ndarray:
    """(class, y, x) scores as one row per pixel, so top-1 agreement is per pixel."""
    return np.moveaxis(np.asarray(logits), 0, -1).reshape(-1, logits.shape[0])


if __name__ == "__main__":
    main()
